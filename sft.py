"""Supervised fine-tuning on atomic-thought trajectories: the first stage of Atom-Searcher.

Atom-Searcher's first stage (arXiv 2508.12800, §3.2; METHOD.md §1.2): a teacher LLM writes full multi-turn
search trajectories whose `<think>` blocks are split into atomic thoughts (teacher_data.py), and the policy is
fine-tuned on them, so that RL starts from a model that already thinks in atoms and calls tools in the right format.

Two pieces:
1. `training_example`: chat messages -> token ids and mask through search_env.render_conversation, *exactly* the
   rollout's token format and mask convention: the forced `<think>` prefix and all template glue and tool
   responses are mask 0, the assistant's own text is mask 1. SFT and RL therefore train on identical token layouts
   (METHOD.md §7); a test checks the ids and masks equal a rollout's.
2. `sft_loss`: token-mean cross-entropy over mask-1 tokens, -Σ m·log p / N_tok. It is GRPO's loss with
   every advantage 1 and no ratio (METHOD.md §8.2), computed by the same chunked `token_logprobs`.

Our choices (the paper gives no SFT details; METHOD.md §6): the loss (token-mean), a constant learning rate, and
`load_examples` refusing rows written with another system prompt than the run's (the policy would be trained on
one prompt and rolled out on another).

Run:
    python teacher_data.py ...                   # teacher data (teacher_data.py; --help lists the flags)
    python sft.py --data sft.jsonl --model DIR --out DIR2 [--steps N]     (also under torchrun: FSDP2)
The 8-GPU FSDP2 run of this stage is `torchrun --nproc_per_node=8 train.py --stage sft ...`.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from grpo import collate, micro_batches
from logprobs import token_logprobs
from search_env import render_conversation


def sft_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
             n_tokens: float | None = None) -> torch.Tensor:
    """L = -Σ_{b,t} m_{b,t} log p(y_{b,t} | y_<t) / N_tok: token-mean cross-entropy over mask-1 tokens.

    `n_tokens` is the mask-1 count of the whole optimizer step (all micro-batches and ranks), so the
    gradient does not depend on how the step is split; default: this micro-batch's own count.
    """
    logp = token_logprobs(model, input_ids, attention_mask)                    # (B, T) fp32
    n = loss_mask.sum() if n_tokens is None else n_tokens
    return -(logp * loss_mask).sum() / max(float(n), 1.0)


# ----------------------------------------------------------------------------- training
def training_example(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Chat messages -> one SFT example: (prompt_ids + ids, mask with 0 over the prompt)."""
    prompt_ids, ids, mask = render_conversation(tokenizer, messages)
    return prompt_ids + ids, [0] * len(prompt_ids) + mask


def first_turn(example: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """An example cut after its first trained span: the prompt and the first assistant turn only.

    Our toy-demo warm-up (train.py --sft-warmup-steps): on these ~3x shorter sequences the tiny model learns
    to copy the question's name into its thoughts and query within ~200 steps, which on whole trajectories it
    had not done after 300 (LOG.md); a pretrained LLM arrives with that in-context copying already.
    """
    ids, mask = example
    if 1 not in mask:
        raise ValueError("example has no trained (mask-1) token")
    end = mask.index(1)
    while end < len(mask) and mask[end] == 1:
        end += 1
    return ids[:end], mask[:end]


def sft_step(model, rows: list[tuple[list[int], list[int]]], *, pad_id: int, micro_batch_tokens: int,
             n_tokens: float, loss_scale: float = 1.0, max_count=None) -> float:
    """Forward + backward of one optimizer step's rows in token-budget micro-batches; returns the step's loss.

    Gradients accumulate; each micro-batch's loss is divided by the step's global token count `n_tokens`
    (times `loss_scale`, which a caller under gradient averaging sets to the world size), so the sum over
    micro-batches and ranks is the token-mean of the whole step. `max_count(n)` (several ranks) is the largest
    micro-batch count over the ranks: each FSDP forward/backward is a collective, so a rank with fewer pads with
    micro-batches of one two-token row of mask 0 (the same path, a zero loss).
    """
    device = next(model.parameters()).device
    total = 0.0
    mbs = micro_batches(rows, micro_batch_tokens)
    if max_count is not None:
        mbs += [[([pad_id, pad_id], [0, 0])]] * (max_count(len(mbs)) - len(mbs))
    for mb in mbs:
        input_ids, attention_mask, loss_mask = (x.to(device) for x in collate(mb, pad_id))
        loss = sft_loss(model, input_ids, attention_mask, loss_mask, n_tokens=n_tokens)
        (loss * loss_scale).backward()
        total += loss.item()
    return total


def train_sft(model, examples: list[tuple[list[int], list[int]]], *, pad_id: int, steps: int, batch_size: int,
              lr: float, micro_batch_tokens: int = 8192, grad_clip: float = 1.0, seed: int = 0, log=print,
              rank: int = 0, all_reduce=None, loss_scale: float = 1.0, max_count=None) -> list[float]:
    """Plain SFT loop: AdamW, constant lr, `steps` steps of `batch_size` examples per rank -> per-step losses.

    Each example is prompt_ids + ids with mask (0 on the prompt). Under several ranks `all_reduce(tensor)` sums a
    tensor across ranks (the step's token count), a model that averages gradients over ranks (FSDP, DDP) needs
    `loss_scale` = the world size, and `max_count` equalizes the micro-batch counts (distributed.sft_collectives).
    """
    generator = random.Random(seed + rank)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        t0 = time.perf_counter()
        rows = [examples[generator.randrange(len(examples))] for _ in range(batch_size)]
        n_tokens = torch.tensor(float(sum(sum(m) for _, m in rows)))
        if all_reduce is not None:
            all_reduce(n_tokens)                      # global mask-1 count of the step, once, before backward
        loss = sft_step(model, rows, pad_id=pad_id, micro_batch_tokens=micro_batch_tokens, n_tokens=n_tokens.item(),
                        loss_scale=loss_scale, max_count=max_count)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if torch.isfinite(grad_norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss)
        if log and (step % 10 == 0 or step == steps - 1):
            log(f"sft step {step:4d} | loss {loss:.4f} | grad_norm {float(grad_norm):.3f} | "
                f"tokens {int(n_tokens.item())} | {time.perf_counter() - t0:.2f}s")
    return losses


def load_examples(path: str, tokenizer, *, system: str | None = None,
                  max_context: int | None = None) -> list[tuple[list[int], list[int]]]:
    """SFT jsonl (rows with "messages") -> (prompt_ids + ids, mask) examples. A bad row, a row whose system prompt
    is not `system` (the run's) or one longer than `max_context` tokens is a ValueError naming file and line."""
    examples = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
                example = training_example(tokenizer, messages)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not an SFT row with valid chat messages: {e}") from None
            if system is not None and messages[0]["content"] != system:
                raise ValueError(f"{path}:{n}: written with another system prompt than this run's (made for other "
                                 f"tools, e.g. another --retriever, or for the toy world?): it begins "
                                 f"{messages[0]['content'][:60]!r}, this run's {system[:60]!r}")
            if max_context is not None and len(example[0]) > max_context:
                raise ValueError(f"{path}:{n}: {len(example[0])} tokens, beyond --max-context {max_context}: make the "
                                 "data with the same --max-context as the run")
            examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no SFT rows")
    return examples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="SFT jsonl (rows with chat 'messages')")
    parser.add_argument("--model", required=True, help="HF model directory or name")
    parser.add_argument("--out", required=True, help="output directory for the fine-tuned checkpoint")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step per rank")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192, help="padded tokens per forward/backward")
    parser.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (constant)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (offset by rank)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer
    from distributed import Dist, export_hf, load_model, sft_collectives
    d = Dist()                                        # the same script under python and torchrun (FSDP2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = load_model(args.model, d)
    examples = load_examples(args.data, tokenizer)
    train_sft(model, examples, pad_id=tokenizer.pad_token_id or 0, steps=args.steps, batch_size=args.batch_size,
              lr=args.lr, micro_batch_tokens=args.micro_batch_tokens, seed=args.seed, **sft_collectives(d),
              log=print if d.rank == 0 else None)
    export_hf(Path(args.out), model, tokenizer, d)
    if d.rank == 0:
        print(f"saved {args.out} (bf16)")
    if d.on:
        import torch.distributed as dist
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
