"""bench/bench_train_step.py (the GPU throughput benchmark) runs grpo.grpo_update end to end on CPU, toy shape."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_train_step_runs_and_reports_palm_flops(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train_step.py"), "--tiny", "--batch", "3", "--seq", "200",
           "--prompt", "50", "--steps", "1", "--warmup", "1", "--peak-tflops", "1.0", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, cwd=tmp_path)
    r = json.loads(out.read_text())
    assert r["device"] == "CPU" and r["setup"] == "plain" and r["params"] == 491392   # the toy Qwen2, tied head
    tokens = 3 * 200
    assert abs(r["tokens_per_s"] * r["seconds_per_step"] - tokens) < 1e-6
    assert round(r["trained_tokens_per_s"] * r["seconds_per_step"]) == 3 * (150 - int(0.4 * 150))   # mask-1 only
    # 6·N + 12·L·d·T FLOPs per token (2 layers, attention width 128, T = 200), and MFU against the given peak.
    per_token = r["model_tflops"] * 1e12 * r["seconds_per_step"] / tokens
    assert abs(per_token - (6 * 491392 + 12 * 2 * 128 * 200)) < 1e-3 * per_token
    assert abs(r["mfu"] - r["model_tflops"] / 1.0) < 1e-12


def test_gpu_check_smoke_mode_runs_every_phase_on_cpu(tmp_path):
    """bench/gpu_check.sh --smoke: the device check's steps on CPU (torchrun with one FSDP2 rank: SFT, GRPO with the
    HF engine and a KL reference, a DCP checkpoint, a resume; the log-prob peak; the update benchmark)."""
    import os
    out = tmp_path / "check"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--smoke"], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads((out / "report.json").read_text())
    assert r["device"] == "CPU" and r["resumed"] and r["sft"]["tokens_per_s"] > 0
    assert [g["step"] for g in r["grpo"]] == [1, 2, 3, 4] and all(g["update_tokens"] > 0 for g in r["grpo"])
    assert r["checkpoints"] == ["step_000003", "step_000004"]
    assert r["logprobs"]["tokens"] == 2048 and r["train_step"]["loss"] != 0.0


def test_bench_server_smoke_reports_throughput_errors_and_memory(tmp_path):
    """bench/bench_server.py --smoke: the retrieval server as a subprocess under concurrent clients, then large
    requests: the one over --max-passages is refused, the largest allowed is answered, memory is read."""
    out = tmp_path / "server.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_server.py"), "--smoke", "--out", str(out)],
                   check=True, capture_output=True, timeout=120, cwd=tmp_path)
    r = json.loads(out.read_text())
    t = r["throughput"]
    assert t["requests"] == t["ok"] > 0 and t["errors"] == {} and t["p99_ms"] >= t["p50_ms"] > 0
    refused, answered = r["large"]
    assert refused["shape"] == "512x100" and refused["outcomes"] == {"HTTP 400": 2}
    assert answered["outcomes"] == {"ok": 2} and answered["reply_mb"] > 0
    assert all(x["peak_rss_mb"] >= x["rss_before_mb"] > 0 and x["retained_rss_mb"] > 0 for x in r["large"])
    assert r["server_tracebacks"] == 0 and r["server_counts"]["rejected"] == 2


def test_ablation_runs_every_arm_per_seed_resumes_and_reports_cis_and_plots(tmp_path):
    """bench/ablation.py at toy size: 2 seeds x 3 arms, SFT once per seed (the arms start from its copy), the table
    with a bootstrap CI per compared arm, the two plots; a second call runs nothing again."""
    import os
    out = tmp_path / "ablation"
    tiny = ("--sft-steps 3 --sft-warmup-steps 0 --grpo-steps 2 --prompts-per-step 2 --group-size 2 --eval-limit 3 "
            "--max-turns 2")
    cmd = [sys.executable, str(ROOT / "bench" / "ablation.py"), "--seeds", "2", "--arms", "blend,outcome,sparse-blend",
           "--out", str(out), "--jobs", "2", "--train-args", tiny]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (out / "ablation.md").read_text().split("Reward diagnostics")[0]      # the F1 table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert " vs outcome |" in rows["blend"] and "[" in rows["blend"] and rows["outcome"].count(" - ") >= 1
    assert "sparse-outcome" not in rows and "vs sparse-outcome" not in rows["sparse-blend"]   # its base did not run
    assert (out / "curves.png").stat().st_size > 10_000 and (out / "diagnostics.png").stat().st_size > 10_000
    for seed in (0, 1):
        config = json.loads((out / f"seed{seed}" / "sparse-blend" / "config.json").read_text())
        assert config["toy_judge"] == "blind" and config["toy_types"] == "mentor_city" and config["seed"] == seed
        assert json.loads((out / f"seed{seed}" / "outcome" / "config.json").read_text())["alpha0"] == 0.0
    before = {p: p.stat().st_mtime for p in out.glob("seed*/*/summary.json")}
    assert len(before) == 2 * 4                                     # sft + 3 arms per seed
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and {p: p.stat().st_mtime for p in out.glob("seed*/*/summary.json")} == before


def test_bootstrap_ci_covers_the_mean_and_narrows_with_agreeing_seeds():
    sys.path.insert(0, str(ROOT / "bench"))
    from ablation import bootstrap_ci
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0, 10.0])
    assert lo < 4.0 < hi and lo >= 1.0 and hi <= 10.0
    assert bootstrap_ci([2.0] * 8) == (2.0, 2.0)
