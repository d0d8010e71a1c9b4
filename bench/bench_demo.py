"""Benchmark of the tiny CPU demo: seconds per step of each phase of `python train.py`, and the update's tokens/s.

1. SFT: seconds per optimizer step of the first-turn warm-up and of whole-trajectory SFT (20 steps each, on the
   toy teacher's data, with the toy presets' batch sizes).
2. GRPO from a trained SFT model (`--from RUN`, a train.py output folder with `sft_model/`; the default demo's
   run is the intended one): per-step rollout / judge / update / engine-sync seconds and the update's trained
   tokens per second, over `--grpo-steps` steps with every group kept (`--keep-zero-adv`), so every step updates.
   Without `--from` the GRPO part is skipped: an untrained model's rollouts say nothing about the demo's.
Multiplying by the toy presets' step counts estimates a full run; the README says which numbers were measured
how. Run: `python bench/bench_demo.py --from runs/<demo run>` (about two minutes on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's flat modules
import train  # noqa: E402
from run_setup import setup_toy  # noqa: E402
from sft import first_turn, train_sft  # noqa: E402


def sft_seconds_per_step(steps: int) -> tuple[float, float]:
    args = train.parse_args([])
    env = setup_toy(args, train.Dist())
    examples, _ = train.toy_sft_examples(env, args)
    tok = env["tokenizer"]
    out = []
    for data, batch in (([first_turn(e) for e in examples], 2 * args.sft_batch), (examples, args.sft_batch)):
        t0 = time.perf_counter()
        train_sft(env["model"], data, pad_id=tok.pad_token_id, steps=steps, batch_size=batch, lr=args.sft_lr, log=None)
        out.append((time.perf_counter() - t0) / steps)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", type=Path, default=None, help="train.py output folder with sft_model/")
    p.add_argument("--sft-steps", type=int, default=20, help="steps timed per SFT phase")
    p.add_argument("--grpo-steps", type=int, default=6, help="GRPO steps timed (the first is dropped)")
    args = p.parse_args()
    warm, whole = sft_seconds_per_step(args.sft_steps)
    toy = train.TOY
    print("\n| phase | seconds per step | steps in the demo | seconds in the demo |\n|---|---|---|---|")
    print(f"| SFT warm-up (first turns, batch {2 * toy['sft_batch']}) | {warm:.2f} | {toy['sft_warmup_steps']} | "
          f"{warm * toy['sft_warmup_steps']:.0f} |")
    print(f"| SFT whole trajectories (batch {toy['sft_batch']}) | {whole:.2f} | {toy['sft_steps']} | "
          f"{whole * toy['sft_steps']:.0f} |")
    if args.src is None:
        return
    with tempfile.TemporaryDirectory() as out:
        shutil.copytree(args.src / "sft_model", Path(out) / "sft_model")
        seed = json.loads((args.src / "config.json").read_text())["seed"]
        train.main(["--out", out, "--seed", str(seed), "--stage", "grpo", "--resume", "--keep-zero-adv",
                    "--grpo-steps", str(args.grpo_steps), "--eval-limit", "0", "--save-every", str(args.grpo_steps)])
        records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]

    def mean(key: str) -> float:
        return statistics.mean(r[key] for r in records)

    for k in ("rollout", "judge", "update", "sync"):
        print(f"| GRPO {k} ({toy['prompts_per_step']} x {toy['group_size']} episodes) | {mean('time_' + k):.2f} | "
              f"{toy['grpo_steps']} | {mean('time_' + k) * toy['grpo_steps']:.0f} |")
    print(f"\nGRPO update: {mean('tokens_per_s'):.0f} trained tokens/s ({mean('update_tokens'):.0f} per step)")


if __name__ == "__main__":
    main()
