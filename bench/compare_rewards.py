"""Compare train.py runs, e.g. the paper's ablation (blended vs outcome-only reward), as markdown tables.

For each run folder (train.py --out): held-out test F1 per question type after SFT and after GRPO (summary.json),
the rollout F1 per step in blocks of `--block` steps (metrics.jsonl; F1 rather than the reward, because the two
modes' rewards have different scales), and the first step at which the rollout F1, averaged over the last
`--block` steps, reaches `--threshold`.

Run: `python bench/compare_rewards.py runs/s0-blend runs/s0-outcome ...`
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return summary, [r for r in records if "eval" not in r]        # the per-step records (not the evaluations)


def steps_to(f1: list[float], threshold: float, block: int) -> int | None:
    """First step (1-based) at which the mean rollout F1 of the last `block` steps is >= threshold."""
    for i in range(block, len(f1) + 1):
        if sum(f1[i - block:i]) / block >= threshold:
            return i
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--block", type=int, default=5, help="steps per block of the curve and of the moving mean")
    p.add_argument("--threshold", type=float, default=0.6, help="rollout F1 threshold (0-1)")
    args = p.parse_args()
    rows, curves = [], []
    for run in args.runs:
        summary, records = load(run)
        sft, grpo = summary.get("test_f1_sft_by_type", {}), summary.get("test_f1_grpo_by_type", {})
        f1 = [r["f1"] for r in records]
        reached = steps_to(f1, args.threshold, args.block)
        rows.append(f"| {run.name} | {summary['reward']} | " + " | ".join(
            f"{sft.get(k, float('nan')):.1f} -> {grpo.get(k, float('nan')):.1f}" for k in ("city", "founder",
                                                                                       "mentor_city", "all"))
            + f" | {reached if reached is not None else 'not reached'} |")
        blocks = [sum(f1[i:i + args.block]) / len(f1[i:i + args.block]) for i in range(0, len(f1), args.block)]
        curves.append(f"| {run.name} | " + " | ".join(f"{b:.2f}" for b in blocks) + " |")
    print("| run | reward | city | founder | mentor_city | all | steps to rollout F1 "
          f">= {args.threshold} ({args.block}-step mean) |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    n = max(c.count("|") - 2 for c in curves)
    print(f"\nrollout F1 per block of {args.block} steps:\n\n| run | "
          + " | ".join(f"{i * args.block + 1}-{(i + 1) * args.block}" for i in range(n)) + " |\n|---|"
          + "---|" * n)
    print("\n".join(curves))


if __name__ == "__main__":
    main()
