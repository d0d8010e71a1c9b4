"""`python teacher_data.py` with a teacher behind a real HTTP API: the filter's counts, the files it writes, resume
after a rerun, a torn line or kill -9, and the startup checks. The teacher is tests/scripted_teacher.py on
loopback; questions, corpus and tokenizer are a small toy world's, run through the real run's environment (its
system prompt, BM25 retriever and limits)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import toy_world as tw
from atomic_thought import system_prompt
from engine import SamplingParams
from scripted_teacher import load, make_server
from hostile_server import RawServer, http
from search_env import prompt_ids
from sft import load_examples
from teacher_data import ChatTeacherEngine, main

ROOT = Path(__file__).resolve().parent.parent
N = 24          # questions


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world")
    tw.write_world(tw.build_world(0, tw.WorldConfig(n_train=N, n_dev=2, n_test=2, n_extra_people=4)), folder)
    rows = (folder / "train.jsonl").read_text().splitlines()[:N]          # train_0 ... train_23, in order
    (folder / "questions.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def serve(world, **faults):
    server = make_server(load([str(world / "questions.jsonl")]), model="teacher", **faults)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def args(world, url, out, *extra):
    return ["--teacher-url", url, "--teacher-model", "teacher", "--model", str(world / "model"),
            "--data", str(world / "questions.jsonl"), "--retriever", f"bm25:{world / 'corpus.jsonl'}", "--topk", "2",
            "--max-turns", "3", "--max-new-tokens", "128", "--max-context", "1024", "--teacher-retries", "0",
            "--out", str(out), *extra]


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]



def test_make_data_counts_writes_and_resumes(world, tmp_path, capsys):
    # question i: garbage when i % 7 == 0 (malformed), HTTP 500 on its first request when i % 5 == 0
    server, url = serve(world, garbage_every=7, fail_every=5, fail_times=1)
    out = tmp_path / "sft.jsonl"
    try:
        first = main(args(world, url, out, "--batch-size", "8"))
        # 0, 7, 14, 21 garbage; 5, 10, 15, 20 down (0 and 15 also garbage: 0 counts as down, being tried first)
        assert first == {"kept": 16, "malformed": 3, "no_atoms": 0, "low_f1": 0, "teacher_error": 5}, first
        assert "5 questions failed at the teacher; run the same command again" in capsys.readouterr().err
        kept = rows(out)
        assert len(kept) == 16 and all(r["f1"] == 1.0 for r in kept)
        rejected = {r["id"]: r for r in rows(tmp_path / "sft.jsonl.rejected.jsonl")}
        assert rejected["train_7"]["outcome"] == "malformed" and "no need to search" in rejected["train_7"]["last_turn"]
        assert rejected["train_5"]["detail"].startswith("teacher: HTTP 500")
        stats = json.loads((tmp_path / "sft.jsonl.stats.json").read_text())
        assert stats["counts"] == first and stats["settings"]["system"] == system_prompt(("web_search",))
        # the rows are SFT data for a run with the same system prompt, and only for such a run
        assert len(load_examples(str(out), tw.build_tokenizer(tw.build_world(0, tw.WorldConfig(
            n_train=N, n_dev=2, n_test=2, n_extra_people=4))), system=system_prompt(("web_search",)))) == 16
        with pytest.raises(ValueError, match=r"sft.jsonl:1: written with another system prompt"):
            load_examples(str(out), tw.build_tokenizer(tw.build_world(0)), system=tw.SYSTEM)

        # rerun: only the teacher errors are tried again (the teacher is up now); nothing is written twice
        second = main(args(world, url, out, "--batch-size", "8"))
        assert second == {"kept": 20, "malformed": 4, "no_atoms": 0, "low_f1": 0, "teacher_error": 0}, second
        ids = [r["id"] for r in rows(out)]
        assert len(ids) == len(set(ids)) == 20
        # a third run has nothing to do
        assert main(args(world, url, out)) == second
        assert "24 of 24 questions already finished" in capsys.readouterr().out

        # a torn last line (a kill mid-write) is cut off, and that question is run again
        with open(out, "ab") as f:
            f.write(b'{"id": "train_99", "question": "half a ro')
        assert main(args(world, url, out)) == second
        assert "cut off a torn last line" in capsys.readouterr().err and len(rows(out)) == 20

        # other settings for the same file are refused, naming --out
        with pytest.raises(SystemExit, match=r"error: --out: .* other settings \(topk\)"):
            main(args(world, url, out, "--topk", "3"))
    finally:
        server.shutdown()


def test_a_run_killed_mid_way_loses_nothing_and_resumes(world, tmp_path):
    server, url = serve(world, delay_s=0.05)
    out = tmp_path / "sft.jsonl"
    command = [sys.executable, str(ROOT / "teacher_data.py"), *args(world, url, out, "--batch-size", "2",
                                                                       "--concurrency", "1")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    try:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 2):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        done = [json.loads(line) for line in out.read_bytes().split(b"\n")[:-1]]   # whole lines; a torn one after
        assert 2 <= len(done) < N, "the kill did not land mid-run: the test would be vacuous"
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert finished.returncode == 0, finished.stderr[-2000:]
    finally:
        server.shutdown()
    ids = [r["id"] for r in rows(out)]
    assert sorted(ids) == sorted(f"train_{i}" for i in range(N)) and len(set(ids)) == N
    assert {r["id"] for r in done} <= set(ids)


def test_questions_are_told_apart_by_benchmark_and_id(world, tmp_path):
    """FlashRAG ids ("train_0", ...) repeat across benchmarks: a mix of two files keeps both questions of an id."""
    questions = rows(world / "questions.jsonl")
    for name, part in (("a", questions[:4]), ("b", questions[4:8])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({**r, "id": f"q{i}"}) + "\n"
                                                        for i, r in enumerate(part)))
    server, url = serve(world)
    try:
        both = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"
        counts = main(args(world, url, tmp_path / "sft.jsonl", "--data", both))
    finally:
        server.shutdown()
    assert counts["kept"] == 8
    assert sorted((r["benchmark"], r["id"]) for r in rows(tmp_path / "sft.jsonl")) == \
        [(name, f"q{i}") for name in "ab" for i in range(4)]


def test_rows_too_long_for_the_limits_are_bad_rows_not_teacher_calls(world, tmp_path, capsys):
    """Issue 16: a question over --max-question-chars and one whose prompt leaves no room within --max-context are
    reported with file:line and never sent to the teacher; the other questions are."""
    questions = (world / "questions.jsonl").read_text().splitlines()[:3]
    data = tmp_path / "q.jsonl"
    long = json.dumps({"id": "long", "question": "x y " * 240, "golden_answers": ["a"]})      # 960 characters
    wide = json.dumps({"id": "wide", "question": "x" * 1001, "golden_answers": ["a"]})
    data.write_text("\n".join([questions[0], long, questions[1], wide, questions[2]]) + "\n")
    server, url = serve(world)
    try:
        counts = main(args(world, url, tmp_path / "sft.jsonl", "--data", str(data), "--max-question-chars", "1000"))
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    assert f"{data}:2: prompt is " in err and "max_context is 1024 (--max-context)" in err
    assert f"{data}:4: 'question' has 1001 characters, more than the limit of 1000 (--max-question-chars)" in err
    assert counts["kept"] == 3 and sum(counts.values()) == 3


def test_toy_mode_writes_the_scripted_teachers_data(tmp_path):
    counts = main(["--toy", "--n", "6", "--out", str(tmp_path / "toy.jsonl")])
    assert counts == {"kept": 6, "malformed": 0, "no_atoms": 0, "low_f1": 0, "teacher_error": 0}
    tokenizer = tw.build_tokenizer(tw.build_world(0))
    assert len(load_examples(str(tmp_path / "toy.jsonl"), tokenizer, system=tw.SYSTEM)) == 6


def test_startup_checks_name_the_flag(world, tmp_path):
    server, url = serve(world)
    try:
        with pytest.raises(SystemExit, match=r"error: --teacher-model: .* serves \['teacher'\], not 'gpt-9'"):
            main(args(world, url, tmp_path / "a.jsonl", "--teacher-model", "gpt-9"))
        with pytest.raises(SystemExit, match=r"error: --teacher-url: .* does not answer"):
            main(args(world, "http://127.0.0.1:9", tmp_path / "a.jsonl"))
        with pytest.raises(SystemExit, match=r"error: --retriever: "):
            main(args(world, url, tmp_path / "a.jsonl") + ["--retriever", "http://127.0.0.1:9"])
        with pytest.raises(SystemExit, match=r"error: --max-context: 4096 .* beyond the 2048 positions"):
            main(args(world, url, tmp_path / "a.jsonl") + ["--max-context", "4096"])
        no_template = tmp_path / "no_template"
        tokenizer = tw.build_tokenizer(tw.build_world(0))
        tokenizer.chat_template = None
        tokenizer.save_pretrained(no_template)
        with pytest.raises(SystemExit, match=r"error: --model: cannot use the chat template"):
            main(args(world, url, tmp_path / "a.jsonl") + ["--model", str(no_template)])
    finally:
        server.shutdown()
    assert not (tmp_path / "a.jsonl").exists()          # every check fires before anything is written


def test_chat_teacher_restores_stop_strings_and_flags_bad_replies(world):
    tokenizer = tw.build_tokenizer(tw.build_world(0))
    replies = iter([{"choices": [{"message": {"content": "<think>\nx\n</think>\n<answer> y "}, "stop_reason":
                                  "</answer>", "finish_reason": "stop"}]},
                    {"choices": [{"message": {"content": "<think>\n" + "word " * 300}, "finish_reason": "length"}]},
                    {"choices": []},
                    {"choices": [{"message": {"content": None}, "finish_reason": "length"}]}])
    server = RawServer(lambda path, body: [http("200 OK", {"Content-Type": "application/json"},
                                                json.dumps(next(replies)).encode())])
    teacher = ChatTeacherEngine(server.url, "m", tokenizer, retries=0)
    try:
        prompt = prompt_ids(tokenizer, "Where was Ka Lo Mi born?", "system")
        ok, long, bad, empty = (teacher._one(prompt, SamplingParams(max_new_tokens=64)) for _ in range(4))
    finally:
        server.close()
    assert server.hits == ["/v1/chat/completions"] * 4
    assert empty.error == "teacher: the reply has no content" and empty.finish_reason == "error"   # retried later
    assert ok.text.endswith("</answer>") and ok.finish_reason == "stop" and ok.error is None
    assert long.finish_reason == "length" and len(long.token_ids) == 64
    assert bad.error == "teacher: the reply is not a chat completion" and bad.finish_reason == "error"
