"""Tests of curriculum.py: schedule endpoints, monotonicity, clamping, blend values, the CLI."""
import math
import subprocess
import sys
from pathlib import Path

import pytest

from curriculum import SCHEDULES, alpha, ascii_plot, blend, main, schedule_table

ROOT = Path(__file__).resolve().parent.parent


# ---- alpha: endpoints and hand-computed values -------------------------------------------------

@pytest.mark.parametrize("schedule,start,end", [
    ("linear", 0.5, 0.0), ("constant", 0.5, 0.5), ("cosine", 0.5, 0.0), ("step", 0.5, 0.0)])
def test_endpoints(schedule, start, end):
    assert alpha(0, 100, schedule) == pytest.approx(start, abs=1e-12)
    assert alpha(100, 100, schedule) == pytest.approx(end, abs=1e-12)


def test_default_is_linear_with_alpha0_half():
    # α(t) = α0·(1 − t/T) with α0 = 0.5 (METHOD.md §3.4)
    assert alpha(25, 100) == pytest.approx(0.375)
    assert alpha(1, 4) == pytest.approx(0.375)
    assert alpha(3, 4, alpha0=0.8) == pytest.approx(0.2)


def test_cosine_hand_values():
    # α0·½(1 + cos(π t/T)): t/T = ½ → α0/2; t/T = ¼ → α0·½(1 + √2/2)
    assert alpha(50, 100, "cosine") == pytest.approx(0.25)
    assert alpha(25, 100, "cosine", alpha0=1.0) == pytest.approx(0.5 * (1 + math.sqrt(0.5)))


def test_step_drops_at_step_frac():
    assert alpha(49, 100, "step") == 0.5
    assert alpha(50, 100, "step") == 0.0          # α = α0 while t < step_frac·T
    assert alpha(29, 100, "step", step_frac=0.3) == 0.5
    assert alpha(30, 100, "step", step_frac=0.3) == 0.0
    assert alpha(0, 100, "step", step_frac=0.0) == 0.0      # never any process reward
    assert alpha(100, 100, "step", step_frac=1.0) == 0.0    # t/T = 1 is not < 1
    assert alpha(99, 100, "step", step_frac=1.0) == 0.5


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_monotone_non_increasing_and_bounded(schedule):
    values = [alpha(t, 37, schedule, alpha0=0.7) for t in range(0, 60)]
    assert all(0.0 <= v <= 0.7 for v in values)
    assert all(b <= a for a, b in zip(values, values[1:])), values


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_clamped_past_total_steps(schedule):
    at_end = alpha(50, 50, schedule)
    for t in (51, 75, 10_000):
        assert alpha(t, 50, schedule) == at_end
    assert alpha(10_000, 50, "linear") == 0.0     # never negative
    assert alpha(10_000, 50, "constant") == 0.5


def test_alpha0_zero_switches_process_reward_off():
    assert all(alpha(t, 10, s, alpha0=0.0) == 0.0 for s in SCHEDULES for t in range(12))


def test_float_steps_are_accepted():
    assert alpha(2.5, 10) == pytest.approx(0.375)


@pytest.mark.parametrize("kwargs,match", [
    (dict(step=1, total_steps=10, schedule="exponential"), "unknown schedule 'exponential'"),
    (dict(step=1, total_steps=0), "total_steps must be > 0"),
    (dict(step=1, total_steps=-5), "total_steps must be > 0"),
    (dict(step=-1, total_steps=10), "step must be >= 0"),
    (dict(step=1, total_steps=10, alpha0=1.5), r"alpha0 must be in \[0, 1\]"),
    (dict(step=1, total_steps=10, alpha0=-0.1), r"alpha0 must be in \[0, 1\]"),
    (dict(step=1, total_steps=10, schedule="step", step_frac=2.0), r"step_frac must be in \[0, 1\]"),
    (dict(step=float("nan"), total_steps=10), "step must be finite"),
    (dict(step=1, total_steps=float("inf")), "total_steps must be finite"),
])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        alpha(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(step="3", total_steps=10), "step must be a number, got str"),
    (dict(step=True, total_steps=10), "step must be a number, got bool"),
    (dict(step=1, total_steps=None), "total_steps must be a number, got NoneType"),
])
def test_non_numbers_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        alpha(**kwargs)


# ---- blend -------------------------------------------------------------------------------------

def test_blend_hand_values():
    assert blend(0.8, 0.4, True, 0.25) == pytest.approx(0.25 * 0.4 + 0.75 * 0.8)   # 0.7
    assert blend(0.8, 0.4, True, 0.25) == pytest.approx(0.7)
    assert blend(1.0, 0.0, True, 0.5) == pytest.approx(0.5)
    assert blend(0.0, 1.0, True, 0.5) == pytest.approx(0.5)
    assert blend(0.6, 0.9, True, 0.0) == pytest.approx(0.6)      # outcome only
    assert blend(0.6, 0.9, True, 1.0) == pytest.approx(0.9)      # process only


def test_blend_format_error_is_minus_one_whatever_the_rest():
    assert blend(1.0, 1.0, False, 0.5) == -1.0
    assert blend(0.0, None, False, 0.3) == -1.0
    assert blend(float("nan"), None, False, 0.3) == -1.0   # values of a malformed trajectory are ignored


def test_blend_atr_none_allowed_only_without_process_reward():
    assert blend(0.4, None, True, 0.0) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="atr is None but alpha = 0.5"):
        blend(0.4, None, True, 0.5)


@pytest.mark.parametrize("args,exc,match", [
    ((1.2, 0.5, True, 0.5), ValueError, r"f1 must be in \[0, 1\]"),
    ((0.5, -0.1, True, 0.5), ValueError, r"atr must be in \[0, 1\]"),
    ((0.5, 0.5, True, 1.1), ValueError, r"alpha must be in \[0, 1\]"),
    ((0.5, float("nan"), True, 0.5), ValueError, "atr must be finite"),
    ((0.5, 0.5, 1, 0.5), TypeError, "format_ok must be a bool"),
    ((0.5, "0.5", True, 0.5), TypeError, "atr must be a number"),
])
def test_blend_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        blend(*args)


def test_blend_along_the_schedule():
    # The ATR weight at the start, middle and end of a 100-step run (linear, α0 = 0.5).
    f1, atr = 0.2, 0.8
    rewards = [blend(f1, atr, True, alpha(t, 100)) for t in (0, 50, 100)]
    assert rewards == pytest.approx([0.5, 0.35, 0.2])


# ---- printing ----------------------------------------------------------------------------------

def test_schedule_table_rows_and_values():
    table = schedule_table(200, "linear", 0.5, rows=5)
    assert table == [(0, 0.5), (50, 0.375), (100, 0.25), (150, 0.125), (200, 0.0)]
    assert [s for s, _ in schedule_table(3, rows=11)] == [0, 1, 2, 3]     # no duplicate steps
    with pytest.raises(ValueError, match="rows must be an int >= 2"):
        schedule_table(10, rows=1)


def test_ascii_plot_marks_start_high_and_end_low():
    plot = ascii_plot(100, "linear", 0.5, width=20, height=5).splitlines()
    assert plot[0].startswith("0.500 |*")          # top row, first column: α(0) = α0
    assert plot[4].startswith("0.000 |") and plot[4].endswith("*")   # bottom row, last column: α(T) = 0
    assert sum(line.count("*") for line in plot) == 20                # one mark per column


def test_cli_prints_table_and_plot(capsys):
    main(["--schedule", "cosine", "--total-steps", "10", "--rows", "3"])
    out = capsys.readouterr().out
    assert "schedule=cosine alpha0=0.5 total_steps=10" in out
    assert "       5   0.50  0.2500   0.7500" in out
    assert "0.500 |*" in out


def test_cli_rejects_bad_values_with_usage_error():
    proc = subprocess.run([sys.executable, "curriculum.py", "--total-steps", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "total_steps must be > 0" in proc.stderr and "Traceback" not in proc.stderr


def test_reward_diagnostics_hand_computed_and_additive_over_ranks():
    """Three groups of two at α = 0.5: A is outcome-flat (F1 1, 1) but its ATRs differ, so the blend rescues it;
    B's F1 differ and its ATRs do not; C has a malformed trajectory (R = −1, not judged)."""
    import statistics
    from curriculum import reward_diagnostics, reward_sums
    from rrm_reward import ATR
    f1 = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    ok = [True, True, True, True, False, True]
    atrs = [ATR(0.8), ATR(0.2), ATR(0.5), ATR(0.5), ATR(None), ATR(0.4)]
    rewards = [blend(f, a.value, o, 0.5) for f, a, o in zip(f1, atrs, ok)]
    assert rewards == [0.9, 0.6, 0.75, 0.25, -1.0, 0.2]
    sums = reward_sums(rewards, f1, atrs, ok, 0.5, 2)
    d = reward_diagnostics(sums)
    assert d["f1_group_std"] == pytest.approx((0 + 0.5 + 0) / 3)
    assert d["atr_group_std"] == pytest.approx((0.3 + 0.0) / 2)            # C has one judged trajectory only
    judged = [(a.value, f) for a, f in zip(atrs, f1) if a.value is not None]
    assert d["atr_f1_corr"] == pytest.approx(statistics.correlation(*zip(*judged)))
    # process parts α·ATR: A (0.4, 0.1) var 0.0225, B 0, C (0, 0.2) 0.01;
    # the rest: A 0, B (0.5, 0) 0.0625, C (−1, 0) 0.25
    assert d["atr_adv_share"] == pytest.approx(0.0325 / (0.0325 + 0.3125))
    assert (d["groups_outcome_flat"], d["groups_rescued"]) == (1, 1)
    halves = [reward_sums(rewards[:2], f1[:2], atrs[:2], ok[:2], 0.5, 2),      # rank 0: A; rank 1: B and C
              reward_sums(rewards[2:], f1[2:], atrs[2:], ok[2:], 0.5, 2)]
    assert reward_diagnostics([x + y for x, y in zip(*halves)]) == pytest.approx(d, nan_ok=True)
    outcome_only = reward_diagnostics(reward_sums([f if o else -1.0 for f, o in zip(f1, ok)], f1, [None] * 6, ok,
                                                  0.0, 2))
    assert outcome_only["groups_rescued"] == 0 and math.isnan(outcome_only["atr_f1_corr"])
    assert outcome_only["atr_adv_share"] == 0.0
