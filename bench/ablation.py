"""The paper's ablations on the toy world, over enough seeds to be believed: one command, resumable.

    python bench/ablation.py --seeds 8 --arms blend,outcome,no-mask,sparse-blend,sparse-outcome --out runs/ablation

For each seed, the SFT stage runs once (`train.py --seed S --stage sft`); each arm then runs GRPO from a copy of that
SFT model (`--stage grpo --resume`), so the arms of one seed differ only in what the arm changes. Runs go in parallel,
`--jobs` at a time (default: the core count, one thread each). A run whose summary.json exists is not run again, so
an interrupted ablation continues where it stopped. The toy judge is the answer-blind one (`--toy-judge blind`,
toy_judge.py) unless `--toy-judge oracle`.

Arms (`ARMS`): blend (the paper's reward), outcome (F1 only, α0 = 0), no-mask (tool-response tokens trained too),
and the sparse tier, blend and outcome on the hard mentor_city questions only (`--toy-types mentor_city`), where
after SFT most groups answer all wrong: their outcome rewards are all equal, and only the ATR can separate them.

Writes OUT/ablation.md: held-out test F1 per question type and overall, mean over seeds, for each arm; each arm's
difference to its outcome-only arm (blend and no-mask to outcome, sparse-blend to sparse-outcome), paired by seed,
with a 95% bootstrap confidence interval over seeds (10,000 resamples of the seeds); the steps to reach a rollout
F1 threshold; and the reward diagnostics' means. OUT/curves.png and OUT/diagnostics.png: per step, each arm's mean
over seeds ± one standard deviation (report.plot_panels).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from compare_rewards import steps_to  # noqa: E402
from report import CURVES, DIAGNOSTICS, plot_panels, run_records  # noqa: E402

# arm -> (train.py flags, the outcome-only arm it is compared with)
ARMS = {"blend": ([], "outcome"), "outcome": (["--reward", "outcome"], None),
        "no-mask": (["--no-loss-mask"], "outcome"),
        "sparse-blend": (["--toy-types", "mentor_city"], "sparse-outcome"),
        "sparse-outcome": (["--toy-types", "mentor_city", "--reward", "outcome"], None)}
TYPES = ("city", "founder", "mentor_city", "all")


def bootstrap_ci(diffs: list[float], resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of `diffs` (one per seed), resampling the seeds."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population std of the values that are numbers (an outcome-only arm logs ATR as nan)."""
    xs = [v for v in values if v == v]
    return (statistics.fmean(xs), statistics.pstdev(xs)) if xs else (float("nan"), float("nan"))


def run(args: list[str], log: Path, threads: int) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(args)} failed (exit {proc.returncode}); see {log}")


def seed_runs(seed: int, arms: list[str], out: Path, extra: list[str], threads: int) -> None:
    """The SFT stage of `seed` (once), then its arms one after another."""
    sft = out / f"seed{seed}" / "sft"
    if not (sft / "summary.json").exists():
        shutil.rmtree(sft, ignore_errors=True)
        sft.mkdir(parents=True)
        run(["--seed", str(seed), "--stage", "sft", "--out", str(sft), *extra], sft / "train.log", threads)
    for arm in arms:
        folder = out / f"seed{seed}" / arm
        if (folder / "summary.json").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(sft, folder, ignore=shutil.ignore_patterns("summary.json", "train.log", "metrics.jsonl"))
        run(["--seed", str(seed), "--stage", "grpo", "--resume", "--out", str(folder), *extra, *ARMS[arm][0]],
            folder / "train.log", threads)


def summarize(out: Path, seeds: list[int], arms: list[str], threshold: float) -> str:
    f1 = {arm: {s: json.loads((out / f"seed{s}" / arm / "summary.json").read_text())["test_f1_grpo_by_type"]
                for s in seeds} for arm in arms}
    sft = {s: json.loads((out / f"seed{s}" / "sft" / "summary.json").read_text())["test_f1_sft_by_type"] for s in seeds}
    steps = {arm: {s: run_records(out / f"seed{s}" / arm)[0] for s in seeds} for arm in arms}
    lines = [f"Held-out test F1 (the toy's test split, greedy), mean over {len(seeds)} seeds "
             f"({', '.join(map(str, seeds))}); after SFT: " + ", ".join(
                 f"{t} {statistics.fmean(sft[s][t] for s in seeds):.1f}" for t in TYPES), "",
             "| arm | " + " | ".join(TYPES) + f" | difference to its outcome-only arm (95% CI) | steps to rollout F1 "
             f"{threshold} (runs that reach it) |", "|---" * (len(TYPES) + 3) + "|"]
    for arm in arms:
        means = [statistics.fmean(f1[arm][s][t] for s in seeds) for t in TYPES]
        base = ARMS[arm][1]
        if base in f1:
            diffs = [f1[arm][s]["all"] - f1[base][s]["all"] for s in seeds]
            lo, hi = bootstrap_ci(diffs)
            versus = f"{statistics.fmean(diffs):+.1f} [{lo:+.1f}, {hi:+.1f}] vs {base}"
        else:
            versus = "-"
        reached = [steps_to([r["f1"] for r in steps[arm][s]], threshold, 5) for s in seeds]
        hit = [x for x in reached if x is not None]
        when = f"{statistics.fmean(hit):.1f} ({len(hit)}/{len(seeds)})" if hit else f"- (0/{len(seeds)})"
        lines.append(f"| {arm} | " + " | ".join(f"{m:.1f}" for m in means) + f" | {versus} | {when} |")
    keys = [k for k, _ in DIAGNOSTICS]
    lines += ["", "Reward diagnostics, mean over steps and seeds (curriculum.reward_diagnostics):", "",
              "| arm | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for arm in arms:
        values = []
        for k in keys:
            xs = [r[k] for s in seeds for r in steps[arm][s] if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
            values.append(f"{statistics.fmean(xs):.3f}" if xs else "-")
        lines.append(f"| {arm} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, seeds: list[int], arms: list[str]) -> list[Path]:
    """Per step, each arm's mean over seeds ± one standard deviation."""
    def series(panels):
        result = {}
        for key, _ in panels:
            for arm in arms:
                runs = [run_records(out / f"seed{s}" / arm)[0] for s in seeds]
                n = min(len(r) for r in runs)
                stats = [mean_std([float(r[i].get(key, float("nan"))) for r in runs]) for i in range(n)]
                result.setdefault(key, {})[arm] = (list(range(1, n + 1)), [m for m, _ in stats], [s for _, s in stats])
        return result
    title = f"{len(seeds)} seeds, mean ± std"
    return [plot_panels(out / "curves.png", CURVES, series(CURVES), f"ablation: training curves ({title})"),
            plot_panels(out / "diagnostics.png", DIAGNOSTICS, series(DIAGNOSTICS),
                        f"ablation: reward diagnostics ({title})")]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=8, help="seeds 0..N-1 (each its own world, model and data order)")
    p.add_argument("--arms", default="blend,outcome,no-mask,sparse-blend,sparse-outcome",
                   help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation", help="one folder per seed and arm")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="seeds run at once (one thread each)")
    p.add_argument("--toy-judge", choices=("blind", "oracle"), default="blind", help="the toy judge of every arm")
    p.add_argument("--threshold", type=float, default=0.6, help="rollout F1 threshold of the steps-to column")
    p.add_argument("--train-args", default="", help="more train.py flags for every run, e.g. '--grpo-steps 4'")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown or args.seeds < 2:
        p.error(f"unknown arms {unknown}; choose from {list(ARMS)}" if unknown else "--seeds must be >= 2")
    seeds = list(range(args.seeds))
    extra = ["--toy-judge", args.toy_judge, *args.train_args.split()]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:          # each worker waits on its train.py subprocesses
        for future in [pool.submit(seed_runs, s, arms, args.out, extra, threads) for s in seeds]:
            future.result()
    table = summarize(args.out, seeds, arms, args.threshold)
    (args.out / "ablation.md").write_text(table)
    pictures = plot(args.out, seeds, arms)
    print(table + "\nwrote " + ", ".join(map(str, [args.out / "ablation.md", *pictures])))


if __name__ == "__main__":
    main()
