"""Training throughput of train.py's GRPO update on one device: tokens/s, MFU and peak memory.

A randomly initialised model of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 query / 2 KV heads, MLP 4,864,
vocabulary 151,936, tied embeddings; nothing is downloaded) takes `grpo.grpo_update` steps, the very function
the training loop calls, on synthetic trajectories: a 256-token prompt, then a response in which the first
40% of tokens are a "tool response" (mask 0) and the rest were "sampled" (mask 1). The mask does not change the
compute (every position is forwarded and back-propagated) but it is what the loss trains on.

On a GPU the model is set up as train.py sets it up under torchrun, as one rank (`distributed.prepare_model`:
FSDP2 `fully_shard` per decoder layer, bf16 compute with fp32 reduction, activation checkpointing), so this is
also a check of that path on a real card; `--no-fsdp` times the plain fp32 model instead. On CPU it runs the
plain model; `--tiny` swaps in the toy world's model shape so the script runs in seconds (what the test does).

MFU = achieved model FLOP/s / the card's dense bf16 peak, with model FLOPs per token = 6·N + 12·L·d·T
(PaLM, appendix B: N parameters with the tied embedding counted once, as the LM head's matmul; L layers, d the
attention width, T the sequence length). Activation checkpointing's recomputed forward is not counted, as usual.
The peak is looked up from the device name (H100 / H200 SXM: 989 TFLOP/s) or given with --peak-tflops.

    python bench/bench_train_step.py                       # on a GPU: 0.5B shape, 16 x 2,048 tokens per step
    python bench/bench_train_step.py --tiny --steps 2      # CPU smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's flat modules

import torch  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s) by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)
# toy_model.build_tiny_model's default shape with the seed-0 toy vocabulary (no tokenizer needed to build it).
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=758, max_position_embeddings=2048, tie_word_embeddings=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the toy world's model shape instead of Qwen2.5-0.5B's")
    p.add_argument("--batch", type=int, default=16, help="trajectories per optimizer step")
    p.add_argument("--seq", type=int, default=2048, help="tokens per trajectory, prompt included")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per trajectory (mask 0)")
    p.add_argument("--micro-batch-tokens", type=int, default=8192, help="padded tokens per micro-batch (train.py)")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--no-fsdp", action="store_true", help="GPU: the plain fp32 model, not the one-rank FSDP2 setup")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for MFU")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def model_flops_per_token(config, seq: int) -> tuple[float, int]:
    """(6·N + 12·L·d·T, N): PaLM's training FLOPs per token and the parameter count it uses."""
    from transformers import Qwen2ForCausalLM
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())   # tied embedding counted once
    width = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    return 6.0 * n_params + 12.0 * config.num_hidden_layers * width * seq, n_params


def synthetic_trajectories(n: int, seq: int, prompt: int, vocab: int, rng: random.Random):
    """Trajectories shaped like a rollout's: prompt, then a masked tool-response span, then sampled tokens."""
    from search_env import Trajectory
    trajs = []
    for _ in range(n):
        response = seq - prompt
        tool = int(0.4 * response)
        ids = [rng.randrange(3, vocab) for _ in range(seq)]
        mask = [0] * tool + [1] * (response - tool)
        logprobs = [0.0] * tool + [-rng.uniform(0.1, 3.0) for _ in range(response - tool)]
        trajs.append(Trajectory(question="", golden_answers=[], prompt_ids=ids[:prompt], ids=ids[prompt:],
                                mask=mask, logprobs=logprobs))
    return trajs


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if cuda and not args.no_fsdp:   # one torchrun rank, so that Dist/prepare_model take the FSDP2 path
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", "29512")):
            os.environ.setdefault(key, value)
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from distributed import Dist, prepare_model
    from grpo import grpo_update, training_rows

    d = Dist()
    config = Qwen2Config(**(TINY if args.tiny else QWEN25_05B))
    flops_per_token, n_params = model_flops_per_token(config, args.seq)
    torch.manual_seed(0)
    model = prepare_model(Qwen2ForCausalLM(config), d)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    rng = random.Random(0)
    trajs = synthetic_trajectories(args.batch, args.seq, args.prompt, config.vocab_size, rng)
    rows = training_rows(trajs, [rng.gauss(0.0, 1.0) for _ in trajs])
    n_tokens = d.sum(sum(sum(r.mask) for r in rows))

    def step() -> dict:
        out = grpo_update(model, optimizer, rows, n_tokens=n_tokens, pad_id=0,
                          micro_batch_tokens=args.micro_batch_tokens,
                          temperature=1.0, loss_scale=d.world if d.fsdp else 1, max_count=d.max)
        if cuda:
            torch.cuda.synchronize()
        return out

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step()["loss"] for _ in range(args.steps)]
    seconds = (time.perf_counter() - t0) / args.steps
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite loss in the timed steps: {losses}")

    device = torch.cuda.get_device_name() if cuda else "CPU"
    peak = args.peak_tflops or (next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None) if cuda else None)
    tokens = args.batch * args.seq
    result = {
        "device": device, "setup": "plain" if (not cuda or args.no_fsdp) else "FSDP2, 1 rank (bf16, act. ckpt)",
        "params": n_params, "batch": args.batch, "seq": args.seq, "seconds_per_step": seconds,
        "tokens_per_s": tokens / seconds, "trained_tokens_per_s": sum(sum(t.mask) for t in trajs) / seconds,
        "model_tflops": flops_per_token * tokens / seconds / 1e12, "peak_tflops": peak,
        "mfu": flops_per_token * tokens / seconds / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "loss": losses[-1],
    }
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if d.on:
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
