"""Benchmark of the GRPO update: time against a plain cross-entropy step, and log-prob peak memory.

Two measures from METHOD.md §9's performance targets, printed as markdown tables:

1. Speed: one GRPO update (logprobs.token_logprobs forward + grpo.grpo_loss + backward) against a plain
   cross-entropy step (model forward + F.cross_entropy on the same next tokens + backward), same model and
   tokens. Target: GRPO ≤ 1.15 × CE. The model is a small-but-not-trivial Qwen2 in fp32 on CPU (bf16
   matmuls are slow on most CPUs). token_logprobs recomputes the logits in its backward, one lm_head matmul
   more than CE does, and skips the rows with no gradient: it runs once with a realistic loss mask (prompt
   and tool tokens masked, as train.py trains) and once with every token trained (nothing to skip), so the
   second row shows the price of the recomputation. Two more rows run the previous method (full logits, then
   a chunked fp32 log-softmax with a hand-written backward) and METHOD.md §8.3's
   torch.utils.checkpoint sketch.
2. Memory: peak memory of hidden states → lm_head → log-probs → backward (`logp.sum().backward()`) at
   Qwen2.5-7B's hidden size H = 3584 and vocab V = 152,064, B = 1. A stand-in "model" holds only that last
   step: given hidden states (B, T, H) that require grad, and an lm_head weight. Each method runs in its own
   subprocess and reports the growth of its peak RSS (VmHWM, reset once the weight and hidden states exist),
   so the numbers include the logits where a method makes them, every gradient (lm_head's weight gradient,
   V·H, is in all rows) and every temporary. For logprobs.token_logprobs the table also gives its memory
   formula (`formula_bytes`), and the run ends with that formula at T = 32k in bf16: computed, not measured.

The bench machine is a 2-core AVX2 CPU (AMD EPYC, no AVX512-BF16/AMX) with 24 GiB. There PyTorch's bf16
matmul runs at ~9 GFLOP/s for A·Bᵀ but ~0.1 GFLOP/s for A·B, the layout every lm_head backward uses for the
hidden-state gradient (grad_logits · W), so one bf16 backward at V = 152k, H = 3584 takes over a minute even
at T = 16. The memory half therefore runs in fp32 by default (`--mem-dtype bfloat16` where bf16 matmuls are
fast), at T = 512, where lm_head's weight gradient (2 GiB in fp32) outweighs everything that grows with T;
`--frozen-head` leaves that gradient out to compare the rest. The formula is the same in both dtypes (4- or
2-byte weights). One bf16 run of logprobs.token_logprobs alone at T = 16 (`--mem-dtype bfloat16 --mem-tokens 16
--mem-chunk 1 --mem-methods new`, 80 s) measured 1.16 GiB against the formula's 1.02: the difference is the
fp32 scratch that PyTorch's CPU bf16 matmul allocates for its output (0.14 GiB for one grad_W slice), which
cuBLAS does not.

Run: `python bench/bench_grpo.py` (about 5 minutes on 2 CPU cores, ~5 GB RAM). `--skip-memory` /
`--skip-speed` run one half; `--mem-methods` picks the memory variants (the naive one needs the most RAM).
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
from grpo import grpo_loss  # noqa: E402
from logprobs import token_logprobs  # noqa: E402


# ----------------------------------------------------------------------------- the methods compared

class ChunkedLogSoftmaxGather(torch.autograd.Function):
    """The previous logprobs.token_logprobs, kept as a comparison point: logp[n] = log softmax(z[n] / T)[y[n]]
    over rows of the full logits z (N, V), fp32 `chunk` rows at a time, and a backward that writes
    (onehot(y) − softmax(z / T)) · g / T into one (N, V) gradient in the logits' dtype."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, chunk):
        inv_t = 1.0 / temperature
        lse = logits.new_empty(logits.shape[0], dtype=torch.float32)  # (N,)
        logp = torch.empty_like(lse)
        for s in range(0, logits.shape[0], chunk):
            x = logits[s:s + chunk].to(torch.float32, copy=True).mul_(inv_t)   # (c, V) z / T
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            logp[s:s + chunk] = x.gather(-1, labels[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, labels, lse)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)                                # (N, V) in the logits' dtype
        g = grad_logp * ctx.inv_t
        for s in range(0, logits.shape[0], ctx.chunk):
            p = logits[s:s + ctx.chunk].to(torch.float32, copy=True).mul_(ctx.inv_t)
            p.sub_(lse[s:s + ctx.chunk, None]).exp_()                  # softmax(z / T)
            gs = g[s:s + ctx.chunk, None]
            grad[s:s + ctx.chunk] = p.mul_(-gs).scatter_add_(-1, labels[s:s + ctx.chunk, None], gs)
        return grad, None, None, None


def previous_logprobs(model, input_ids, temperature=1.0, chunk=512):
    """The previous method: the model's full (B, T, V) logits, then ChunkedLogSoftmaxGather."""
    logits = model(input_ids=input_ids, use_cache=False).logits       # (B, T, V)
    B, T, V = logits.shape
    targets = F.pad(input_ids[:, 1:], (0, 1))                          # (B, T), the last one a dummy
    logp = ChunkedLogSoftmaxGather.apply(logits.reshape(B * T, V), targets.reshape(-1), temperature, chunk)
    return F.pad(logp.view(B, T)[:, :-1], (1, 0))                      # (B, T)


def checkpoint_logprobs(model, input_ids, temperature=1.0, chunk=512):
    """The METHOD.md §8.3 sketch: fp32 log-softmax-gather per T chunk under torch.utils.checkpoint."""
    logits = model(input_ids=input_ids, use_cache=False).logits       # (B, T, V)

    def chunk_logp(x, y):                                              # fp32 only inside the chunk
        x = x.float() / temperature
        return x.gather(-1, y.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)

    parts = [checkpoint(chunk_logp, x, y, use_reentrant=False)
             for x, y in zip(logits[:, :-1].split(chunk, 1), input_ids[:, 1:].split(chunk, 1))]
    return F.pad(torch.cat(parts, 1), (1, 0))                          # (B, T)


def naive_logprobs(model, input_ids, temperature=1.0, chunk=None):
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
    every = torch.ones(B, T, dtype=torch.bool)
    every[:, 0] = False                                                # position 0 has no prediction
    adv = torch.randn(B)

    def ce_step():
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)).backward()

    def grpo_step(logprob_fn, m):
        logp = logprob_fn(model, ids, chunk=args.chunk)
        loss, _ = grpo_loss(logp, logp.detach(), adv, m, n_tokens=int(m.sum()))  # one step per batch: r ≡ 1
        loss.backward()

    variants = {
        "plain cross-entropy step": ce_step,
        f"GRPO: token_logprobs + grpo_loss, loss mask ({mask.float().mean():.0%} trained)":
            lambda: grpo_step(token_logprobs, mask),
        "GRPO: token_logprobs + grpo_loss, every token trained": lambda: grpo_step(token_logprobs, every),
        "GRPO: previous method (full logits, chunked fp32), loss mask": lambda: grpo_step(previous_logprobs, mask),
        "GRPO: checkpoint sketch (METHOD.md §8.3), loss mask": lambda: grpo_step(checkpoint_logprobs, mask),
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
          f"{args.layers} layers, V={V}, B={B}, T={T}, chunk {args.chunk}, fp32, {torch.get_num_threads()} "
          f"thread(s), median of {args.reps})\n")
    print("| step | s/step | µs/token | × CE |")
    print("|---|---|---|---|")
    ce = statistics.median(times["plain cross-entropy step"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t:.3f} | {1e6 * t / (B * T):.1f} | {t / ce:.3f} |")


# ----------------------------------------------------------------------------- 2. memory

METHODS = {"new": token_logprobs, "previous": previous_logprobs, "checkpoint": checkpoint_logprobs,
           "naive": naive_logprobs}
NAMES = {"new": "logprobs.token_logprobs (hidden states → log-probs, vocab-sliced backward)",
         "previous": "previous: full logits + chunked fp32 log-softmax", "checkpoint": "checkpoint sketch (METHOD.md §8.3)",
         "naive": "naive: full logits + fp32 log_softmax + gather"}


class LastStep(torch.nn.Module):
    """Stands in for a 7B CausalLM: its body is given final hidden states (B, T, H) that require grad, as the
    final norm would give them; its lm_head and output are a HF CausalLM's (`.logits` = lm_head(hidden))."""

    def __init__(self, hidden, vocab, dtype):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False, device="meta")
        self.lm_head.weight = torch.nn.Parameter(torch.empty(vocab, hidden, dtype=dtype).normal_(0, 0.02))
        self.hidden = None                                             # set by the caller: (B, T, H)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return types.SimpleNamespace(logits=self.lm_head(self.hidden))


def rss_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in KiB, from /proc (Linux). Not ru_maxrss: after
    fork + exec that starts at the parent's RSS, which would hide the child's own growth."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status: the memory bench needs Linux")


def formula_bytes(tokens: int, vocab: int, hidden: int, chunk: int, dtype_bytes: int, stat_bytes: int = 4,
                  weight_grad: bool = True) -> int:
    """logprobs.token_logprobs' backward peak by its memory formula, B = 1, every row but the last with a gradient,
    not counting the hidden states themselves (the model holds them for its own backward anyway):
        grad_W (V·H) + grad_h fp32 and the rows' hidden copy (n·H) + max(one vocab-slice block with the
        (n, H) product, the (N, H) output with its cast),
    where a block is n × width, width = chunk·V // n. A cast between equal dtypes is no copy (fp32 runs).
    weight_grad=False: a frozen lm_head, no grad_W."""
    n = tokens - 1
    width = min(vocab, max(1, chunk * vocab // n))
    cast = dtype_bytes if dtype_bytes != stat_bytes else 0
    block = n * width * (stat_bytes + cast) + n * hidden * dtype_bytes
    end = tokens * hidden * dtype_bytes + n * hidden * cast
    return vocab * hidden * dtype_bytes * weight_grad + n * hidden * (stat_bytes + dtype_bytes) + max(block, end)


def memory_child(method: str, vocab: int, hidden: int, tokens: int, chunk: int, dtype_name: str,
                 frozen_head: bool) -> None:
    """Runs one method in this (fresh) process and prints its peak RSS growth as JSON."""
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    ids = torch.randint(0, vocab, (1, tokens))                         # (B, T), B = 1
    model = LastStep(hidden, vocab, dtype)                             # lm_head weight (V, H)
    model.lm_head.weight.requires_grad_(not frozen_head)
    model.hidden = torch.randn(1, tokens, hidden, dtype=dtype).requires_grad_()  # (B, T, H)
    with open("/proc/self/clear_refs", "w") as f:                     # reset VmHWM: count only what follows
        f.write("5")
    start_kb = rss_kib("VmRSS")
    t0 = time.perf_counter()
    logp = METHODS[method](model, ids, chunk=chunk)
    logp.sum().backward()
    seconds = time.perf_counter() - t0
    peak_kb = rss_kib("VmHWM")                                         # high-water mark since the reset
    assert (model.lm_head.weight.grad is None) == frozen_head and model.hidden.grad is not None
    print(json.dumps({"method": method, "peak_bytes": (peak_kb - start_kb) * 1024, "seconds": seconds}))


def bench_memory(args) -> None:
    rows = []
    for method in args.mem_methods.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", method, "--mem-vocab", str(args.mem_vocab),
               "--mem-hidden", str(args.mem_hidden), "--mem-tokens", str(args.mem_tokens), "--mem-chunk",
               str(args.mem_chunk), "--mem-dtype", args.mem_dtype, "--threads", str(args.threads)]
        cmd += ["--frozen-head"] * args.frozen_head
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"memory child {method!r} failed (out of RAM? leave out naive):\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gib, T, V, H = 2 ** 30, args.mem_tokens, args.mem_vocab, args.mem_hidden
    size = torch.empty(0, dtype=getattr(torch, args.mem_dtype)).element_size()
    logits_bytes, bf16_logits = T * V * size, T * V * 2                # B = 1
    predicted = formula_bytes(T, V, H, args.mem_chunk, size, weight_grad=not args.frozen_head)
    print(f"\n### Log-prob peak memory, hidden states → log-probs → backward (B=1, T={T}, H={H}, V={V}, "
          f"{args.mem_dtype} weights and hidden states, chunk {args.mem_chunk}"
          f"{', frozen lm_head: no weight gradient' if args.frozen_head else ''}; {os.cpu_count()}-core CPU, "
          f"{args.threads} thread(s))\n")
    print(f"Logits at this T: {logits_bytes / gib:.2f} GiB in {args.mem_dtype}, {bf16_logits / gib:.2f} GiB in bf16. "
          + ("" if args.frozen_head else f"lm_head's weight gradient alone, in every row: {V * H * size / gib:.2f} GiB.")
          + "\n")
    print(f"| method | peak RSS growth (GiB) | formula (GiB) | × {args.mem_dtype} logits | × bf16 logits | s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        formula = f"{predicted / gib:.2f}" if row["method"] == "new" else ""
        print(f"| {NAMES[row['method']]} | {row['peak_bytes'] / gib:.2f} | {formula} | "
              f"{row['peak_bytes'] / logits_bytes:.2f} | {row['peak_bytes'] / bf16_logits:.2f} | {row['seconds']:.0f} |")
    # The METHOD.md §9 target, from the same formula in bf16 at T = 32k with token_logprobs' default chunk 512.
    T32 = 32_768
    at_32k = formula_bytes(T32, V, H, 512, 2)
    hidden_states = T32 * H * 2
    print(f"\nComputed, not measured: logprobs.token_logprobs at T = {T32}, bf16, chunk 512 needs "
          f"{at_32k / gib:.2f} GiB by the formula above = {at_32k / (T32 * V * 2):.3f}× the bf16 logits "
          f"({T32 * V * 2 / gib:.2f} GiB); counting the hidden states too, {(at_32k + hidden_states) / gib:.2f} GiB "
          f"= {(at_32k + hidden_states) / (T32 * V * 2):.3f}× (target ≤ 0.3×).")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # what to run
    parser.add_argument("--skip-speed", action="store_true", help="skip the speed comparison")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 = stable on a shared box)")
    # speed
    parser.add_argument("--chunk", type=int, default=512, help="rows per fp32 chunk in the speed half")
    parser.add_argument("--batch", type=int, default=8, help="B, trajectories per step")
    parser.add_argument("--seq", type=int, default=512, help="T, tokens per trajectory")
    parser.add_argument("--vocab", type=int, default=8192, help="V of the speed model")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the speed model")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the speed model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (median reported)")
    # memory
    parser.add_argument("--mem-vocab", type=int, default=152_064, help="V for the memory test (Qwen2.5)")
    parser.add_argument("--mem-hidden", type=int, default=3584, help="H for the memory test (Qwen2.5-7B)")
    parser.add_argument("--mem-tokens", type=int, default=512, help="T for the memory test")
    parser.add_argument("--mem-chunk", type=int, default=64,
                        help="chunk for the memory test: 64 cuts T = 512 into 8 row chunks and the backward into "
                             "8 vocab slices, a regime like chunk 512 at T = 32k (smaller chunks are slow on CPU)")
    parser.add_argument("--mem-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and hidden states (bfloat16 only where bf16 matmuls are fast, see above)")
    parser.add_argument("--mem-methods", default="new,previous,naive",
                        help=f"comma-separated memory variants, of {','.join(METHODS)}")
    parser.add_argument("--frozen-head", action="store_true",
                        help="lm_head's weight without gradient: leaves only the memory that grows with T")
    parser.add_argument("--memory-child", choices=tuple(METHODS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not set(args.mem_methods.split(",")) <= set(METHODS):
        parser.error(f"--mem-methods: choose from {','.join(METHODS)}, got {args.mem_methods}")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.mem_vocab, args.mem_hidden, args.mem_tokens, args.mem_chunk,
                     args.mem_dtype, args.frozen_head)
    else:
        if not args.skip_speed:
            bench_speed(args)
        if not args.skip_memory:
            bench_memory(args)
