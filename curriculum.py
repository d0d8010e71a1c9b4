"""The curriculum reward: blend the process reward (ATR) with the outcome reward (F1) under a schedule.

Atom-Searcher (arXiv 2508.12800, §3; PAPER.md §3) rewards a trajectory with a mix of the Atomic Thought
Reward, which the Reasoning Reward Model gives to the agent's reasoning (rrm_reward.py), and the answer's
token-set F1 (evaluate.py). Early in RL the outcome reward is sparse and the process reward guides
exploration, so its weight α starts high; as the policy learns to answer, the weight moves to the outcome:

    R = −1                               if the trajectory's format is invalid (DeepResearcher's format reward)
    R = α(t)·ATR + (1 − α(t))·F1         otherwise
    α(t) = α0·(1 − t/T)                  t = RL step, T = total RL steps  (the default, "linear")

The paper states a decaying ATR weight; its exact constants are unverified. Our choices (each a flag):
1. α0 = 0.5 and the linear form above are the default.
2. Other schedules for ablations (`SCHEDULES`): "constant" (α0 throughout), "cosine"
   (α0·½(1 + cos(π t/T)): slow start, slow end), "step" (α0 until `step_frac`·T, then 0; `step_frac`
   defaults to ½, i.e. process reward for the first half of training only).
3. Past the end (t > T, e.g. extra steps after a resume) every schedule is evaluated at t = T, so α stays
   in [0, α0]: α never goes negative and never grows again.
4. `--alpha0 0` switches the process reward off (outcome-only RL, DeepResearcher's recipe); the RRM then
   need not run at all, so `blend` accepts `atr=None` when α == 0.

Schedules are pure functions of the step number (as nanoGPT's `get_lr(it)`), so they can be printed,
plotted and tested at their endpoints. Run `python curriculum.py [--schedule cosine] [--alpha0 0.5]
[--total-steps 200]` to print a schedule as a table and an ASCII plot.
"""
from __future__ import annotations

import argparse
import math

SCHEDULES = ("linear", "constant", "cosine", "step")


def _check_number(name: str, value) -> float:
    """A real, finite number (bool is rejected: `alpha(True, ...)` is a bug, not step 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def alpha(step: int, total_steps: int, schedule: str = "linear", alpha0: float = 0.5,
          step_frac: float = 0.5) -> float:
    """The ATR weight α at RL step `step` of `total_steps` (PAPER.md §3); always in [0, alpha0].

    `step_frac` only matters for schedule="step": α = alpha0 while step < step_frac·total_steps, else 0.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    t, big_t = _check_number("step", step), _check_number("total_steps", total_steps)
    alpha0 = _check_number("alpha0", alpha0)
    step_frac = _check_number("step_frac", step_frac)
    if big_t <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if t < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= alpha0 <= 1.0:
        # α0 > 1 would give the F1 term a negative weight (1 − α < 0) early in training.
        raise ValueError(f"alpha0 must be in [0, 1], got {alpha0}")
    if not 0.0 <= step_frac <= 1.0:
        raise ValueError(f"step_frac must be in [0, 1], got {step_frac}")
    frac = min(t / big_t, 1.0)                 # t/T, held at 1 past the end (choice 3)
    if schedule == "linear":
        a = alpha0 * (1.0 - frac)              # α = α0·(1 − t/T)
    elif schedule == "constant":
        a = alpha0
    elif schedule == "cosine":
        a = alpha0 * 0.5 * (1.0 + math.cos(math.pi * frac))   # α = α0·½(1 + cos(π t/T))
    else:  # "step"
        a = alpha0 if frac < step_frac else 0.0
    return min(max(a, 0.0), alpha0)            # guards float round-off (cos(π) is not exactly −1)


def blend(f1: float, atr: float | None, format_ok: bool, alpha: float) -> float:
    """The trajectory reward R (PAPER.md §3): −1 if the format is invalid, else α·ATR + (1 − α)·F1.

    A malformed trajectory gets −1 whatever its F1/ATR (DeepResearcher's format reward; the RRM never
    judged it, so `atr` is typically None there). `atr` may be None with a valid format only when
    α == 0 (outcome-only training without an RRM).
    """
    if not isinstance(format_ok, bool):
        raise TypeError(f"format_ok must be a bool, got {type(format_ok).__name__}")
    a = _check_number("alpha", alpha)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not format_ok:
        return -1.0
    f = _check_number("f1", f1)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"f1 must be in [0, 1], got {f1}")
    if atr is None:
        if a != 0.0:
            raise ValueError(f"atr is None but alpha = {a}: a well-formed trajectory needs its ATR "
                             "unless the process reward is off (alpha 0)")
        return f
    r = _check_number("atr", atr)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"atr must be in [0, 1], got {atr}")
    return a * r + (1.0 - a) * f               # R = α·ATR + (1 − α)·F1


def schedule_table(total_steps: int, schedule: str = "linear", alpha0: float = 0.5,
                   step_frac: float = 0.5, rows: int = 11) -> list[tuple[int, float]]:
    """(step, α) at `rows` evenly spaced steps from 0 to total_steps inclusive, for printing."""
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 2:
        raise ValueError(f"rows must be an int >= 2, got {rows!r}")
    steps = sorted({round(i * total_steps / (rows - 1)) for i in range(rows)})
    return [(s, alpha(s, total_steps, schedule, alpha0, step_frac)) for s in steps]


def ascii_plot(total_steps: int, schedule: str = "linear", alpha0: float = 0.5,
               step_frac: float = 0.5, width: int = 60, height: int = 10) -> str:
    """α over training as a character grid: x = step (0 .. total_steps), y = α (0 .. max(alpha0, tiny))."""
    if width < 2 or height < 2:
        raise ValueError(f"width and height must be >= 2, got {width}x{height}")
    top = alpha0 if alpha0 > 0 else 1.0        # a flat zero line still needs a y scale
    cols = [alpha(round(i * total_steps / (width - 1)), total_steps, schedule, alpha0, step_frac)
            for i in range(width)]
    levels = [round(a / top * (height - 1)) for a in cols]   # row index of each column, 0 = bottom
    lines = []
    for row in range(height - 1, -1, -1):
        label = f"{top * row / (height - 1):5.3f} |"
        lines.append(label + "".join("*" if lv == row else " " for lv in levels))
    lines.append("      +" + "-" * width)
    lines.append(f"       0{'step':^{width - 2 - len(str(total_steps))}}{total_steps}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print the ATR weight α(t) of the curriculum reward "
                                            "R = α·ATR + (1 − α)·F1 over training (PAPER.md §3).")
    p.add_argument("--schedule", choices=SCHEDULES, default="linear",
                   help="shape of α(t): linear decay (the paper's decaying weight; default), constant, "
                        "cosine, step")
    p.add_argument("--alpha0", type=float, default=0.5,
                   help="α at step 0 (our choice 0.5; 0 = outcome reward only)")
    p.add_argument("--total-steps", type=int, default=200, help="T, the number of RL steps")
    p.add_argument("--step-frac", type=float, default=0.5,
                   help="schedule=step only: α drops from alpha0 to 0 at step_frac·T")
    p.add_argument("--rows", type=int, default=11, help="rows of the table")
    args = p.parse_args(argv)
    try:  # a bad value becomes a usage error naming the flag's problem, not a traceback
        table = schedule_table(args.total_steps, args.schedule, args.alpha0, args.step_frac, args.rows)
    except ValueError as e:
        p.error(str(e))
    print(f"schedule={args.schedule} alpha0={args.alpha0} total_steps={args.total_steps}"
          + (f" step_frac={args.step_frac}" if args.schedule == "step" else ""))
    print(f"{'step':>8} {'t/T':>6} {'alpha':>7} {'1-alpha':>8}")
    for s, a in table:
        print(f"{s:>8d} {s / args.total_steps:>6.2f} {a:>7.4f} {1 - a:>8.4f}")
    print()
    print(ascii_plot(args.total_steps, args.schedule, args.alpha0, args.step_frac))


if __name__ == "__main__":
    main()
