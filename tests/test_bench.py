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
