"""A training run's log: one line per step on rank 0, metrics.jsonl always, wandb when asked, summary.json at the end.

`Logger` writes the records train.py makes per GRPO step and per held-out evaluation. A step's record has every
reward component (`reward_stats`: the batch means of reward, format_ok, F1 and ATR, and why episodes ended), the
reward diagnostics (curriculum.reward_diagnostics: within-group spread of F1 and ATR, their correlation, the ATR's
share of the reward variance, outcome-flat and rescued groups), the tools' and judge's counters of the step
(`counters` / `counter_deltas`: searches, failures, cache hits, judge calls and fallbacks), all summed over the
ranks, its timings, and on GPUs the trainer's peak memory in the rollout and the update (mem_rollout_gb,
mem_update_gb). Failures that training survives are counted here, never silently. A held-out evaluation is a
{"step", "eval"} record with F1/EM per benchmark (the toy's benchmarks are its question types). `write_summary`
writes summary.json and prints the F1 table. report.py, bench/compare_rewards.py, bench/bench_demo.py,
bench/ablation.py and bench/gpu_check.py read what this writes.
"""
from __future__ import annotations

import json
from pathlib import Path

from distributed import Dist


# Counters of the tools and of the judge, logged per step (summed over ranks): searches, failures, cache use, judge
# calls and fallbacks. Failures that training survives are counted here, never silently.
TOOL_COUNTERS = ("search_calls", "search_failures", "empty_results", "cache_hits", "cache_misses", "browse_calls",
                 "browse_failures", "browse_refused", "reader_failures", "bad_arguments", "unknown_tool")
JUDGE_COUNTERS = ("calls", "retries", "parse_errors", "http_errors", "fallbacks")


def reward_stats(trajs, rewards: list[float], f1: list[float], atrs: list) -> dict:
    """The batch means of the reward's components (curriculum.trajectory_rewards) and why episodes ended."""
    n, judged = len(trajs), [a.value for a in atrs if a is not None and a.value is not None]
    ends = {f"finish_{end}": sum(t.finish == end for t in trajs) / n    # why the others failed
            for end in ("format_error", "length", "max_turns")}
    return {"format_ok": sum(t.format_ok for t in trajs) / n, **ends, "f1": sum(f1) / n,
            "atr": sum(judged) / len(judged) if judged else float("nan"), "reward": sum(rewards) / n}


def counters(env) -> dict:
    """This rank's TOOL_COUNTERS and JUDGE_COUNTERS (as judge_*) so far."""
    return {**{k: env["tools"].stats[k] for k in TOOL_COUNTERS},
            **{f"judge_{k}": env["rrm"].stats[k] if env["rrm"] else 0 for k in JUDGE_COUNTERS}}


def counter_deltas(env, before: dict, d: Dist) -> dict:
    """The counters' increments since `before` (a `counters` snapshot), summed over the ranks."""
    now = counters(env)
    return dict(zip(now, (int(v) for v in d.sums([now[k] - before[k] for k in now]))))


class Logger:
    """One `|`-separated line per step on rank 0, a jsonl file always, wandb when asked (imported lazily).

    `keep_until`: the step the run resumes after (-1: a fresh start). The records of later steps, logged by a run
    that was stopped or killed and about to be redone, are dropped from metrics.jsonl first, and so are a torn or
    unreadable line (a kill mid-write) and, in a file an older version wrote after a resume, the records a
    restarted step replaces: every step appears once, in order."""

    def __init__(self, out: Path, d: Dist, wandb_project: str | None, config: dict, keep_until: int = -1):
        self.on = d.rank == 0
        path = out / "metrics.jsonl"
        if self.on and path.exists():
            kept: list[tuple[int, str]] = []
            for line in path.read_text(errors="replace").splitlines(keepends=True):
                record = logged_record(line)
                if record is None or record["step"] > keep_until:
                    continue
                if "eval" not in record and kept and kept[-1][0] >= record["step"]:   # the step was redone
                    kept = [(step, kept_line) for step, kept_line in kept if step < record["step"]]
                kept.append((record["step"], line))
            path.with_suffix(".tmp").write_text("".join(line for _, line in kept))
            path.with_suffix(".tmp").replace(path)
        self.file = open(path, "a") if self.on else None
        self.wandb = None
        if self.on and wandb_project:
            import wandb
            self.wandb = wandb.init(project=wandb_project, config=config)

    def log(self, record: dict, line_keys: tuple[str, ...] = ()) -> None:
        if not self.on:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log(record)
        if line_keys:
            print(" | ".join(f"{k} {record[k]:.3f}" if isinstance(record[k], float) else f"{k} {record[k]}"
                             for k in line_keys if k in record), flush=True)

    def log_eval(self, step: int, scores: dict, counts: dict) -> None:
        self.log({"step": step, "eval": scores, **counts})
        if self.on:
            print(f"eval after step {step} | " + " | ".join(f"{name} F1 {s['f1']:.1f} EM {s['em']:.1f} (n {s['n']})"
                                                          for name, s in scores.items()), flush=True)


def logged_record(line: str) -> dict | None:
    """One metrics.jsonl line as a record with an int "step"; None for a torn or unreadable line."""
    try:
        record = json.loads(line) if line.endswith("\n") else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def write_summary(out: Path, summary: dict) -> None:
    """The run's summary.json (rank 0, at the end), and its held-out F1 after SFT and after GRPO as a table."""
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    after_sft, after_grpo = summary.get("test_f1_sft_by_type", {}), summary.get("test_f1_grpo_by_type", {})
    if after_sft:
        print("\n| held-out benchmark (toy: question type) | F1 after SFT | F1 after GRPO |\n|---|---|---|")
        for name, f1 in after_sft.items():
            print(f"| {name} | {f1:.1f} | {'-' if name not in after_grpo else f'{after_grpo[name]:.1f}'} |")
    print(f"\nsummary: {json.dumps(summary)}  ({out})", flush=True)
