"""The reward: the outcome reward (F1 of the answer), and its curriculum blend with the process reward (ATR).

Atom-Searcher (arXiv 2508.12800, §3; METHOD.md §3) rewards a trajectory with a mix of the Atomic Thought
Reward, which the Reasoning Reward Model gives to the agent's reasoning (rrm_reward.py), and the answer's
token-set F1. Early in RL the outcome reward is sparse and the process reward guides exploration, so its
weight α starts high; as the policy learns to answer, the weight moves to the outcome:

    R = −1                               if the trajectory's format is invalid (DeepResearcher's format reward)
    R = α(t)·ATR + (1 − α(t))·F1         otherwise                                         (`trajectory_rewards`)
    α(t) = α0·(1 − t/T)                  t = RL step, T = total RL steps  (the default, "linear")      (`alpha`)

The outcome (DeepResearcher's reward, arXiv 2504.03160; `f1_score`, `exact_match`) is word-level F1 over token
sets, max over golden answers; the same function scores held-out benchmarks (evaluate.py):
    normalize(s) = collapse_whitespace(replace_punctuation_by_space(lower(s)))
    P = |pred ∩ gold| / |pred|,  R = |pred ∩ gold| / |gold|,  F1 = 2PR / (P + R)   (sets of tokens)
Set F1, not SQuAD's multiset F1, and no removal of articles, as DeepResearcher's `format_and_f1.py`, so our numbers
compare with the paper's tables ("new new york" vs "new york": set F1 1.0, multiset F1 0.8).
`NORMALIZATIONS` (flag --answer-normalization):
- "deepresearcher" (the default): exactly theirs, `str.lower`, then each character of `string.punctuation` (ASCII)
  replaced by a space. Non-ASCII punctuation and symbols stay inside words: "1979–80" is one token, "100°C" is
  "100°c", an answer of emoji is an emoji token.
- "unicode" (our option): every Unicode P* and S* character is punctuation, replaced before NFKC and again after it,
  so "1979–80" -> "1979 80", "Ｔｏｋｙｏ" == "tokyo", "€5" -> "5", "O’Neil" -> "o neil", and an answer of
  emoji normalizes to nothing. METHOD.md §3 lists where the two differ.
Edge cases, both: an empty prediction (None, "", "?!") scores 0 for F1 and EM (DeepResearcher's EM would call ""
equal to a golden answer that normalizes to ""); an empty golden list is a data error (ValueError); golden answers
must be a non-empty list/tuple of strings (a bare string is rejected); yes/no has no special case ("yes, he did" vs
"yes" -> 0.5); hyphens and apostrophes are punctuation ("Jean-Luc" -> "jean luc"); digits stay ("1,000" -> "1 000").

The paper states a decaying ATR weight; its exact constants are unverified. Our choices (each a flag):
1. α0 = 0.5 and the linear form above are the default (--alpha0, --schedule).
2. Other schedules for ablations (`SCHEDULES`): "constant" (α0 throughout), "cosine"
   (α0·½(1 + cos(π t/T)): slow start, slow end), "step" (α0 until `step_frac`·T, then 0; `step_frac`
   defaults to ½, i.e. process reward for the first half of training only; --step-frac).
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
import string
import unicodedata

# ----------------------------------------------------------------------------- the outcome reward: F1 and EM
NORMALIZATIONS = ("deepresearcher", "unicode")
_ASCII_PUNCTUATION = str.maketrans(string.punctuation, " " * len(string.punctuation))


def _unicode_punctuation_to_space(text: str) -> str:
    return "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)   # P* or S*


def normalize_answer(text: str, normalization: str = "deepresearcher") -> str:
    """Lower-case, punctuation -> space, collapse whitespace (module docstring: which characters count)."""
    if not isinstance(text, str):
        raise TypeError(f"answer must be a string, got {type(text).__name__}")
    if normalization == "deepresearcher":
        text = text.lower().translate(_ASCII_PUNCTUATION)
    elif normalization == "unicode":
        # Symbols go before NFKC (which would spell "™" as "TM") and again after it (it spells "…" as "...").
        text = unicodedata.normalize("NFKC", _unicode_punctuation_to_space(text)).lower()
        text = _unicode_punctuation_to_space(text)
    else:
        raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")
    return " ".join(text.split())          # str.split() splits on any Unicode whitespace, as their \s+


def _check_inputs(prediction, golden_answers) -> None:
    if prediction is not None and not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string or None, got {type(prediction).__name__}")
    if isinstance(golden_answers, str) or not isinstance(golden_answers, (list, tuple)):
        raise TypeError(f"golden_answers must be a list of strings, got {type(golden_answers).__name__}"
                        + (" (wrap a single answer in a list)" if isinstance(golden_answers, str) else ""))
    if not golden_answers:
        raise ValueError("golden_answers is empty: every question needs at least one golden answer")
    bad = [g for g in golden_answers if not isinstance(g, str)]
    if bad:
        raise TypeError(f"golden_answers must all be strings, got {bad[:3]!r}")


def _set_f1(pred_tokens: set[str], gold_tokens: set[str]) -> float:
    common = len(pred_tokens & gold_tokens)
    if common == 0:                         # also covers an empty gold set
        return 0.0
    precision = common / len(pred_tokens)   # P = |pred ∩ gold| / |pred|
    recall = common / len(gold_tokens)      # R = |pred ∩ gold| / |gold|
    return 2 * precision * recall / (precision + recall)   # F1 = 2PR / (P + R)


def f1_score(prediction: str | None, golden_answers: list[str], normalization: str = "deepresearcher") -> float:
    """Token-set F1 of `prediction` against the best-matching golden answer, in [0, 1]."""
    _check_inputs(prediction, golden_answers)
    pred_tokens = set(normalize_answer(prediction, normalization).split()) if prediction is not None else set()
    if not pred_tokens:
        return 0.0                          # an empty answer earns nothing
    return max(_set_f1(pred_tokens, set(normalize_answer(g, normalization).split())) for g in golden_answers)


def exact_match(prediction: str | None, golden_answers: list[str], normalization: str = "deepresearcher") -> float:
    """1.0 if the normalized prediction equals any normalized golden answer, else 0.0."""
    _check_inputs(prediction, golden_answers)
    pred = normalize_answer(prediction, normalization) if prediction is not None else ""
    if not pred:
        return 0.0                          # an empty gold cannot make "" a match
    return float(any(pred == normalize_answer(g, normalization) for g in golden_answers))


def outcome(trajectory, normalization: str = "deepresearcher") -> tuple[float, float]:
    """(F1, EM) of a trajectory's answer; a malformed trajectory has no answer and scores 0 (METHOD.md §3, §5)."""
    answer = trajectory.answer if trajectory.format_ok else None
    return (f1_score(answer, trajectory.golden_answers, normalization),
            exact_match(answer, trajectory.golden_answers, normalization))


# ----------------------------------------------------------------------------- the curriculum blend
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
    """The ATR weight α at RL step `step` of `total_steps` (METHOD.md §3); always in [0, alpha0].

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
    """The trajectory reward R (METHOD.md §3): −1 if the format is invalid, else α·ATR + (1 − α)·F1.

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


def trajectory_rewards(trajectories: list, rrm, alpha_t: float, normalization: str = "deepresearcher"):
    """R_i = −1 if malformed, else α(t)·ATR_i + (1 − α(t))·F1_i for a rollout batch -> (rewards, F1s, ATRs).

    The RRM (rrm_reward.RRM.score) judges the batch only when α(t) > 0; the ATRs are rrm_reward.ATR objects, None
    where not judged (a malformed trajectory, or α = 0)."""
    f1 = [outcome(t, normalization)[0] for t in trajectories]
    atrs = rrm.score(trajectories) if alpha_t > 0 and rrm is not None else [None] * len(trajectories)
    atr = [a.value if a is not None else None for a in atrs]            # value None: not judged (malformed)
    rewards = [blend(f, a, t.format_ok, alpha_t) for f, a, t in zip(f1, atr, trajectories)]
    return rewards, f1, atrs


# ----------------------------------------------------------------------------- how much signal each part carries
DIAGNOSTIC_SUMS = ("groups", "f1_std_sum", "atr_groups", "atr_std_sum", "n_judged", "sum_a", "sum_f", "sum_aa",
                   "sum_ff", "sum_af", "var_process", "var_rest", "outcome_flat", "rescued")


def _std(xs: list[float]) -> float:            # population std of a group (0 for one value)
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


def reward_sums(rewards: list[float], f1: list[float], atrs: list, format_ok: list[bool], alpha_t: float,
                group_size: int) -> list[float]:
    """Additive sums over a rollout batch's groups (DIAGNOSTIC_SUMS, in order), so that ranks can add theirs up
    before `reward_diagnostics` turns them into ratios. The process part of R_i is p_i = α·ATR_i (0 where not
    judged), the rest q_i = R_i − p_i; a group is "outcome-flat" when the reward with α = 0 (−1 if malformed, else
    F1) is equal across it, and "rescued" when it is outcome-flat but its blended rewards are not: the groups that
    get an advantage only because of the ATR (the reward-sparsity argument of arXiv 2508.12800 §3)."""
    sums = dict.fromkeys(DIAGNOSTIC_SUMS, 0.0)
    value = [a.value if a is not None else None for a in atrs]
    for g in range(0, len(rewards), group_size):
        idx = range(g, g + group_size)
        sums["groups"] += 1
        sums["f1_std_sum"] += _std([f1[i] for i in idx])
        judged = [value[i] for i in idx if value[i] is not None]
        if len(judged) >= 2:
            sums["atr_groups"] += 1
            sums["atr_std_sum"] += _std(judged)
        process = [alpha_t * value[i] if value[i] is not None else 0.0 for i in idx]
        sums["var_process"] += _std(process) ** 2
        sums["var_rest"] += _std([rewards[i] - p for i, p in zip(idx, process)]) ** 2
        outcome = [f1[i] if format_ok[i] else -1.0 for i in idx]
        flat = max(outcome) == min(outcome)
        sums["outcome_flat"] += flat
        sums["rescued"] += flat and max(rewards[i] for i in idx) != min(rewards[i] for i in idx)
    for a, f in ((value[i], f1[i]) for i in range(len(rewards)) if value[i] is not None):
        sums["n_judged"] += 1
        for key, x in (("sum_a", a), ("sum_f", f), ("sum_aa", a * a), ("sum_ff", f * f), ("sum_af", a * f)):
            sums[key] += x
    return [sums[k] for k in DIAGNOSTIC_SUMS]


def reward_diagnostics(sums: list[float]) -> dict[str, float]:
    """The step's reward diagnostics from `reward_sums` (added up over the ranks): mean within-group std of F1 and
    of ATR, the Pearson correlation of ATR and F1 over the judged trajectories (nan when undefined), the ATR's share
    of the within-group reward variance, Σ Var_g(p) / (Σ Var_g(p) + Σ Var_g(q)), and the counts of outcome-flat and
    rescued groups."""
    s = dict(zip(DIAGNOSTIC_SUMS, sums))
    n = s["n_judged"]
    cov = s["sum_af"] / n - s["sum_a"] * s["sum_f"] / n ** 2 if n else 0.0
    var_a = s["sum_aa"] / n - (s["sum_a"] / n) ** 2 if n else 0.0
    var_f = s["sum_ff"] / n - (s["sum_f"] / n) ** 2 if n else 0.0
    nan = float("nan")
    total = s["var_process"] + s["var_rest"]
    return {"f1_group_std": s["f1_std_sum"] / s["groups"] if s["groups"] else nan,
            "atr_group_std": s["atr_std_sum"] / s["atr_groups"] if s["atr_groups"] else nan,
            "atr_f1_corr": cov / math.sqrt(var_a * var_f) if var_a > 1e-12 and var_f > 1e-12 else nan,
            "atr_adv_share": s["var_process"] / total if total > 0 else nan,
            "groups_outcome_flat": int(s["outcome_flat"]), "groups_rescued": int(s["rescued"])}


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
                                            "R = α·ATR + (1 − α)·F1 over training (METHOD.md §3).")
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
