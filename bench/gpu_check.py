"""The device check of the GPU path: train.py's real-run code on one GPU, with tokens/s, MFU and peak memory per phase.

What it runs (bench/gpu_check.sh calls the steps in order; no internet, no vLLM, ~8 minutes on one H100/H200):
1. `prepare`: a randomly initialised model of Qwen2.5-0.5B's shape (bench_train_step.QWEN25_05B) with the toy
   world's tokenizer, the toy world's questions and corpus as a real run's files, and SFT rows from the toy
   teacher under the real run's system prompt (`teacher_data.py --toy --real-prompt`). A random model samples
   ids outside the toy tokenizer's vocabulary, so every episode is one malformed turn: the GRPO steps run with
   --keep-zero-adv, to time the update anyway.
2. `torchrun --nproc_per_node=1 train.py --model ...`: FSDP2 with bf16 compute, SFT steps, GRPO steps with the HF
   engine and a KL reference, a DCP checkpoint each step, stopped after 2 steps; then `--resume` for 2 more.
3. `logprobs`: the peak GPU memory of logprobs.token_logprobs + backward at T = 32k, V = 152k, H = 3,584 (Qwen2.5-7B's
   head), over the bf16 logits' size (the target: <= 0.3).
4. `bench/bench_train_step.py`: the GRPO update alone at 16 x 2,048 tokens, tokens/s and MFU (6N + 12LdT).
5. `report`: one JSON of the numbers per phase (the README's table takes them, with the card named).
`--smoke` runs the same steps on CPU with the toy model's shape and small sizes (tests/test_bench.py, in make test).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's flat modules

import torch  # noqa: E402


def prepare(out: Path, smoke: bool) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM
    import teacher_data
    import toy_world as tw
    from qa_data import write_jsonl
    from bench_train_step import QWEN25_05B, TINY
    out.mkdir(parents=True, exist_ok=True)
    world = tw.build_world(0)
    write_jsonl(world.splits["train"], out / "train.jsonl")
    write_jsonl(world.corpus, out / "corpus.jsonl")
    tokenizer = tw.build_tokenizer(world)
    shape = dict(TINY, vocab_size=len(tokenizer)) if smoke else QWEN25_05B
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    teacher_data.main(["--toy", "--real-prompt", "--n", "64", "--out", str(out / "sft.jsonl")])


class HeadOnly(torch.nn.Module):
    """A stand-in for a causal LM whose last hidden states are given: its forward is only the lm_head, which is what
    logprobs.token_logprobs replaces by its chunked log-probs (so no (T, V) logits exist)."""

    def __init__(self, hidden: torch.Tensor, vocab: int):
        super().__init__()
        self.hidden = hidden                                              # (1, T, H), requires grad
        self.lm_head = torch.nn.Linear(hidden.shape[-1], vocab, bias=False, device=hidden.device,
                                       dtype=hidden.dtype)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(logits=self.lm_head(self.hidden))


def logprobs_peak(tokens: int, vocab: int, hidden_size: int) -> dict:
    """Peak memory of token_logprobs + backward over what was allocated before (hidden states and head weights),
    and its ratio to the bf16 logits' size (tokens x vocab x 2 bytes), on the GPU (or the CPU's RSS in --smoke)."""
    from logprobs import token_logprobs
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, device=device, dtype=torch.bfloat16).requires_grad_()
    model = HeadOnly(hidden, vocab)
    ids = torch.randint(0, vocab, (1, tokens), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    token_logprobs(model, ids).sum().backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else None
    logits = tokens * vocab * 2
    return {"tokens": tokens, "vocab": vocab, "hidden": hidden_size, "seconds": seconds,
            "peak_gib": peak / 2**30 if peak is not None else None, "bf16_logits_gib": logits / 2**30,
            "ratio_to_bf16_logits": peak / logits if peak is not None else None}


def report(out: Path) -> dict:
    """The numbers per phase from the run's files and the steps' JSON outputs."""
    run = out / "run"
    records = [json.loads(line) for line in open(run / "metrics.jsonl") if '"eval"' not in line]
    summary = json.loads((run / "summary.json").read_text())
    log = (out / "train_1.log").read_text()
    sft = [(int(t), float(s)) for t, s in re.findall(r"sft step +\d+ \| .*? tokens (\d+) \| ([\d.]+)s", log)][1:]
    result = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "sft": {"tokens_per_s": sum(t for t, _ in sft) / max(sum(s for _, s in sft), 1e-9),
                "peak_gib": summary.get("mem_sft_gb")},
        "grpo": [{k: r.get(k) for k in ("step", "time_sync", "time_rollout", "time_update", "tokens_per_s",
                                         "mem_rollout_gb", "mem_update_gb", "update_tokens", "update_kl")}
                 for r in records],
        "resumed": [r["step"] for r in records] == [1, 2, 3, 4] and "sft step" not in (out / "train_2.log").read_text(),
        "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
        "logprobs": json.loads((out / "logprobs.json").read_text()),
        "train_step": json.loads((out / "train_step.json").read_text()),
    }
    print(json.dumps(result, indent=1))
    (out / "report.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("prepare", "logprobs", "report"))
    p.add_argument("--out", type=Path, required=True, help="the check's folder")
    p.add_argument("--smoke", action="store_true", help="CPU: the toy model's shape and small sizes")
    p.add_argument("--tokens", type=int, default=32768, help="logprobs: sequence length T")
    args = p.parse_args(argv)
    if args.step == "prepare":
        prepare(args.out, args.smoke)
    elif args.step == "logprobs":
        result = logprobs_peak(args.tokens, 152064 if not args.smoke else 4096, 3584 if not args.smoke else 64)
        print(json.dumps(result))
        (args.out / "logprobs.json").write_text(json.dumps(result))
    else:
        report(args.out)


if __name__ == "__main__":
    main()
