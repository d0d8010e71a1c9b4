"""bench/bench_train_step.py (the GPU throughput benchmark) runs train.grpo_update end to end on CPU, toy shape."""
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
