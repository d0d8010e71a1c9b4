"""Benchmark of the GRPO update: time against a plain cross-entropy step, and log-prob peak memory.

Two measures from DESIGN.md's performance targets, printed as markdown tables:

1. Speed: one GRPO update (grpo.token_logprobs forward + grpo.grpo_loss + backward) against a plain
   cross-entropy step (model forward + F.cross_entropy on the same next tokens + backward), same model and
   tokens. Target: GRPO ≤ 1.15 × CE. The model is a small-but-not-trivial Qwen2 in fp32 on CPU (bf16
   matmuls are slow on most CPUs). A third row runs the torch.utils.checkpoint form sketched in
   training_design.md §3.7, which grpo.py replaced by a hand-written backward.
2. Memory: peak memory of the log-prob computation, backward included (`logp.sum().backward()`), at
   Qwen2.5's vocab V = 152,064 and T = 4,096, B = 1. To avoid a real 7B model, a fake "model" returns a
   given bf16 logits tensor (B, T, V) that requires grad, as lm_head's output would. Each variant runs in
   its own subprocess and reports the growth of its peak RSS (VmHWM) over the RSS before the logits were
   allocated, so the numbers include the logits themselves and their bf16 gradient. Any method has to hold
   those two (lm_head's backward consumes the gradient), so ~2× the logits is the floor.

Run: `python bench/bench_grpo.py` (about 2 minutes on 2 CPU cores, ~9 GB RAM for the naive variant;
`--mem-tokens 2048` halves that). `--skip-memory` / `--skip-speed` run one half; `--compare-checkpoint`
also measures the checkpoint sketch's memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
from grpo import grpo_loss, token_logprobs  # noqa: E402


def checkpoint_logprobs(model, input_ids, temperature=1.0, chunk=512):
    """The training_design.md §3.7 sketch: fp32 log-softmax-gather per T chunk under torch.utils.checkpoint.
    Kept here only as the comparison point for grpo.token_logprobs (same alignment: logp[:, 0] = 0)."""
    logits = model(input_ids=input_ids, use_cache=False).logits       # (B, T, V)

    def chunk_logp(x, y):                                              # fp32 only inside the chunk
        x = x.float() / temperature
        return x.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)

    parts = [checkpoint(chunk_logp, x, y, use_reentrant=False)
             for x, y in zip(logits[:, :-1].split(chunk, 1), input_ids[:, 1:].split(chunk, 1))]
    return F.pad(torch.cat(parts, 1), (1, 0))                          # (B, T)


def naive_logprobs(model, input_ids, temperature=1.0):
    """The straightforward form: a full fp32 (B, T, V) log-softmax, then gather."""
    logits = model(input_ids=input_ids, use_cache=False).logits       # (B, T, V)
    logsm = F.log_softmax(logits.float() / temperature, dim=-1)        # fp32 (B, T, V)
    return F.pad(logsm[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1), (1, 0))


# ----------------------------------------------------------------------------- 1. speed

def bench_speed(args) -> None:
    import transformers  # imported here: the memory children do not need it

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=4 * args.hidden,
                                      max_position_embeddings=args.seq)
    model = transformers.Qwen2ForCausalLM(config).float()
    B, T, V = args.batch, args.seq, args.vocab
    ids = torch.randint(0, V, (B, T))                                  # (B, T)
    # A realistic loss mask: prompt masked, then alternating sampled (1) and tool (0) spans.
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[:, T // 8:] = (torch.arange(T - T // 8) // 48) % 3 != 2        # 2 of every 3 spans are policy tokens
    adv = torch.randn(B)
    n_tokens = int(mask.sum())

    def ce_step():
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()

    def grpo_step(logprob_fn):
        logp = logprob_fn()
        loss, _ = grpo_loss(logp, logp.detach(), adv, mask, n_tokens=n_tokens)  # one step per batch: r ≡ 1
        loss.backward()

    variants = {
        "plain cross-entropy step": ce_step,
        f"GRPO: token_logprobs (chunk {args.chunk}) + grpo_loss": lambda: grpo_step(
            lambda: token_logprobs(model, ids, chunk=args.chunk)),
        f"GRPO: checkpoint sketch (§3.7, chunk {args.chunk})": lambda: grpo_step(
            lambda: checkpoint_logprobs(model, ids, chunk=args.chunk)),
    }
    times = {name: [] for name in variants}
    for rep in range(args.warmup + args.reps):                         # interleaved: noise hits all alike
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            if rep >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n### GRPO update vs cross-entropy step (Qwen2 {n_params / 1e6:.1f}M params, hidden {args.hidden}, "
          f"{args.layers} layers, V={V}, B={B}, T={T}, fp32, {torch.get_num_threads()} thread(s), "
          f"median of {args.reps})\n")
    print("| step | s/step | µs/token | × CE |")
    print("|---|---|---|---|")
    ce = statistics.median(times["plain cross-entropy step"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.3f} | {1e6 * t / (B * T):.1f} | {t / ce:.3f} |")


# ----------------------------------------------------------------------------- 2. memory

def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB, from /proc (Linux). Not ru_maxrss: after
    fork + exec that starts at the parent's RSS, which would hide the child's own growth."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status: the memory bench needs Linux")


def memory_child(variant: str, vocab: int, tokens: int, chunk: int) -> None:
    """Runs one variant in this (fresh) process and prints its peak RSS growth as JSON."""
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens))                         # (B, T), B = 1
    start_kb = rss_kib("VmRSS")
    logits = torch.empty(1, tokens, vocab, dtype=torch.bfloat16)       # (B, T, V) bf16, as lm_head gives on GPU
    block = (3.0 * torch.randn(256, vocab)).bfloat16()                 # one random block, tiled: a fast fill
    for s in range(0, tokens, 256):
        logits[0, s:s + 256] = block[:tokens - s]
    del block
    logits.requires_grad_()
    fake_model = lambda **kwargs: types.SimpleNamespace(logits=logits)  # noqa: E731 (stands in for a 7B model)
    t0 = time.perf_counter()
    if variant == "chunked":
        logp = token_logprobs(fake_model, ids, chunk=chunk)
    elif variant == "checkpoint":
        logp = checkpoint_logprobs(fake_model, ids, chunk=chunk)
    else:
        logp = naive_logprobs(fake_model, ids)
    logp.sum().backward()
    seconds = time.perf_counter() - t0
    peak_kb = rss_kib("VmHWM")                                         # high-water mark of this process
    print(json.dumps({"variant": variant, "peak_bytes": (peak_kb - start_kb) * 1024, "seconds": seconds,
                      "logits_bytes": logits.numel() * logits.element_size()}))


def bench_memory(args) -> None:
    rows = []
    variants = ("chunked", "checkpoint", "naive") if args.compare_checkpoint else ("chunked", "naive")
    for variant in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", variant, "--mem-vocab", str(args.mem_vocab),
               "--mem-tokens", str(args.mem_tokens), "--chunk", str(args.chunk), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"memory child {variant!r} failed (out of RAM? try --mem-tokens 2048):\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gib = 2 ** 30
    logits_bytes = rows[0]["logits_bytes"]
    print(f"\n### Log-prob peak memory, forward + backward (B=1, T={args.mem_tokens}, V={args.mem_vocab}, "
          f"bf16 logits = {logits_bytes / gib:.2f} GiB; chunk {args.chunk})\n")
    print("| variant | peak RSS growth (GiB) | × bf16 logits | s |")
    print("|---|---|---|---|")
    names = {"chunked": "grpo.token_logprobs (chunked fp32, hand-written backward)",
             "checkpoint": "checkpoint sketch (§3.7)", "naive": "naive fp32 log_softmax + gather"}
    for row in rows:
        print(f"| {names[row['variant']]} | {row['peak_bytes'] / gib:.2f} | "
              f"{row['peak_bytes'] / logits_bytes:.2f} | {row['seconds']:.1f} |")
    print("\n(The floor is ~2×: the logits plus their bf16 gradient, which lm_head's backward needs.)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # what to run
    parser.add_argument("--skip-speed", action="store_true", help="skip the speed comparison")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = stable on a shared box)")
    parser.add_argument("--chunk", type=int, default=512, help="rows per fp32 chunk in token_logprobs")
    # speed
    parser.add_argument("--batch", type=int, default=8, help="B, trajectories per step")
    parser.add_argument("--seq", type=int, default=512, help="T, tokens per trajectory")
    parser.add_argument("--vocab", type=int, default=8192, help="V of the speed model")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the speed model")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the speed model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (median reported)")
    # memory
    parser.add_argument("--mem-vocab", type=int, default=152_064, help="V for the memory test (Qwen2.5)")
    parser.add_argument("--mem-tokens", type=int, default=4096, help="T for the memory test")
    parser.add_argument("--compare-checkpoint", action="store_true",
                        help="also measure the memory of the checkpoint sketch (+35 s)")
    parser.add_argument("--memory-child", choices=("chunked", "checkpoint", "naive"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.mem_vocab, args.mem_tokens, args.chunk)
    else:
        if not args.skip_speed:
            bench_speed(args)
        if not args.skip_memory:
            bench_memory(args)
