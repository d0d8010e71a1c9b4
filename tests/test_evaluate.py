"""evaluate.py and qa_data.py: metric aggregation, bad rows, data sampling and mixes, the contamination filter, the
answer judge over HTTP, trajectory records on the toy world, the CLI end to end, and (ATOM_REAL_DATA) real data."""
import json
import math
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import toy_world as tw
from toy_world import ToyTeacherEngine
from engine import Completion, SamplingParams
from evaluate import (AnswerJudge, aggregate, contains_answer, contamination_filter, evaluate_questions, load_records,
                      main, parse_args, parse_verdict)
from search_env import sampled_runs
from qa_data import load_benchmark, load_jsonl_questions, load_questions, mix_counts, parse_mix, sample_rows, \
    warn_bad_rows
from retrievers import BM25Retriever
from toy_judge import ToyRRM
from tools import make_tools
from tools import Tools

ROOT = Path(__file__).resolve().parent.parent


# ---- aggregation of a hand-built trajectories file ---------------------------------------------------

def record(benchmark, f1, em, finish, turns, n_atoms, tool_calls, response, think, judge=None):
    return {"benchmark": benchmark, "f1": f1, "em": em, "finish": finish, "turns": [{}] * turns, "n_atoms": n_atoms,
            "tool_calls": tool_calls, "response_tokens": response, "think_tokens": think, "judge": judge}


def test_aggregate_of_a_hand_built_trajectories_file(tmp_path):
    rows = [record("nq", 1.0, 1.0, "answer", 2, 8, 1, 100, 60, "correct"),
            record("nq", 0.5, 0.0, "answer", 3, 6, 2, 50, 20, "incorrect"),
            record("nq", 0.0, 0.0, "format_error", 0, 0, 0, 30, 30, "unparseable"),
            record("popqa", 0.0, 0.0, "max_turns", 4, 4, 4, 10, 5)]
    path = tmp_path / "trajectories.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = aggregate(load_records(path))
    assert list(out) == ["nq", "popqa"]
    nq = out["nq"]
    assert nq["n"] == 3 and nq["f1"] == pytest.approx(0.5) and nq["em"] == pytest.approx(1 / 3)
    assert nq["judge_accuracy"] == pytest.approx(1 / 3)            # unparseable counts as not correct
    assert nq["judge_verdicts"] == {"correct": 1, "incorrect": 1, "unparseable": 1}
    assert nq["response_tokens"] == 60 and nq["think_tokens"] == pytest.approx(110 / 3)
    assert nq["atoms_per_turn"] == pytest.approx(14 / 5)            # per parsed turn, not per question
    assert nq["tool_calls"] == 1 and nq["turns"] == pytest.approx(5 / 3)
    assert nq["finish"] == {"answer": 2, "format_error": 1}
    assert out["popqa"]["judge_accuracy"] is None and out["popqa"]["atoms_per_turn"] == 1.0
    with pytest.raises(ValueError, match=r"record 1 .*\['think_tokens'\]"):
        aggregate([rows[0], {k: v for k, v in rows[1].items() if k != "think_tokens"}])


# ---- bad rows, sampling, mixes ------------------------------------------------------------------------

def test_bad_rows_are_reported_with_file_and_line(tmp_path, capsys):
    lines = ['{"id": "q1", "question": "Who?", "golden_answers": ["A"]}',
             "{not json",
             '{"id": "q3", "golden_answers": ["A"]}',
             '{"id": "q4", "question": "Who?", "golden_answers": []}',
             '{"id": "q5", "question": "Who?", "golden_answers": "A"}',
             "",
             '{"id": "q7", "question": 7, "golden_answers": ["A"]}',
             '{"id": "q8", "question": "Who?", "golden_answers": ["A", 3]}',
             '{"question": "Where?", "golden_answers": ["B"], "metadata": {"x": 1}}',
             '["a list"]']
    path = tmp_path / "nq.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rows, bad = load_jsonl_questions(path)
    assert [r["id"] for r in rows] == ["q1", "nq_9"]          # a missing id gets <stem>_<line>
    assert [m.split(": ", 1)[0] for m in bad] == [f"{path}:{n}" for n in (2, 3, 4, 5, 7, 8, 10)]
    assert "not valid JSON" in bad[0] and "'question'" in bad[1] and "'golden_answers'" in bad[2]
    assert "'golden_answers'" in bad[3] and "'question'" in bad[4] and "expected a JSON object" in bad[6]
    warn_bad_rows(bad, cap=3)
    err = capsys.readouterr().err.splitlines()
    assert err[:3] == [f"warning: skipped bad row {m}" for m in bad[:3]]
    assert err[3] == "warning: 7 bad row(s) skipped (4 not shown)"
    assert load_benchmark("nq", tmp_path) == (rows, bad)
    with pytest.raises(FileNotFoundError, match=r"popqa.jsonl does not exist .*\['nq'\]"):
        load_benchmark("popqa", tmp_path)


def test_hub_without_network_says_to_pass_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(OSError, match="--data-dir"):
        load_benchmark("nq")
    with pytest.raises(OSError, match="nq"):
        load_questions("hub:nq=1,hotpotqa=3")


def test_sampling_is_seeded_ordered_and_per_benchmark():
    rows = [{"id": str(i)} for i in range(1000)]
    a = sample_rows(rows, 512, 0, "nq")
    assert len(a) == 512 and a == sample_rows(rows, 512, 0, "nq")
    assert [int(r["id"]) for r in a] == sorted(int(r["id"]) for r in a)      # file order kept
    assert a != sample_rows(rows, 512, 1, "nq") and a != sample_rows(rows, 512, 0, "popqa")
    assert sample_rows(rows[:125], 512, 0, "bamboogle") == rows[:125]          # all of a small benchmark


def test_training_mix_proportions():
    assert parse_mix("nq=1,triviaqa=1,hotpotqa=3,2wikimultihopqa=3") == {
        "nq": 1.0, "triviaqa": 1.0, "hotpotqa": 3.0, "2wikimultihopqa": 3.0}
    for bad in ("nq=0", "nq", "=1", "nq=x", "nq=1,,hotpotqa=3", "nq=inf", "nq=1,nq=2"):
        with pytest.raises(ValueError, match="name=positive_weight"):
            parse_mix(bad)
    available, weights = {"a": 100, "b": 100, "c": 300, "d": 1000}, {"a": 1, "b": 1, "c": 3, "d": 3}
    assert mix_counts(available, weights, 80) == {"a": 10, "b": 10, "c": 30, "d": 30}
    # 10 * (1, 1, 3, 3) / 8 = 1.25, 1.25, 3.75, 3.75: the two largest remainders get the two left over
    assert mix_counts(available, weights, 10) == {"a": 1, "b": 1, "c": 4, "d": 4}
    assert mix_counts(available, weights, None) == {"a": 100, "b": 100, "c": 300, "d": 300}
    with pytest.raises(ValueError, match="at most 800"):
        mix_counts(available, weights, 801)


def test_load_questions_from_local_paths(tmp_path, capsys):
    for name, n in (("a", 5), ("b", 7)):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": f"{name}{i}", "question": f"q{i}?", "golden_answers": [f"g{i}"]}) + "\n"
            for i in range(n)) + "{broken\n")
    paths = f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}"
    rows = load_questions(paths)
    assert [r["id"] for r in rows] == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(7)]
    assert "a.jsonl:6: not valid JSON" in capsys.readouterr().err
    assert load_questions(paths, limit=4, seed=1) == load_questions([str(tmp_path / "a.jsonl"),
                                                                     str(tmp_path / "b.jsonl")], limit=4, seed=1)
    assert len(load_questions(paths, limit=4)) == 4
    assert [r["benchmark"] for r in rows] == ["a"] * 5 + ["b"] * 7          # each row tagged with its file's stem
    per = load_questions(paths, limit_per_benchmark=3, seed=2)
    assert [r["benchmark"] for r in per] == ["a"] * 3 + ["b"] * 3 and {r["id"] for r in per} <= {r["id"] for r in rows}
    assert load_questions(paths, limit_per_benchmark=3, seed=2) == per


# ---- contamination filter ---------------------------------------------------------------------------

def test_contains_answer_matches_whole_normalized_words():
    assert contains_answer("I think it's Paris, France.", ["paris"])
    assert contains_answer("NEW-YORK city", ["New York"])
    assert not contains_answer("Parisian food", ["Paris"]) and not contains_answer("anything", ["?!"])


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return {"input_ids": [len(messages[1]["content"])]}   # one id per question, told apart by length


class MemoryEngine:
    """Answers from 'memory': for question length L, the answers[L] list is sampled in turn."""

    def __init__(self, answers):
        self.answers, self.prompts = answers, []

    def generate(self, prompts, params):
        self.prompts += prompts
        assert params.stop == ("\n\n",) and params.temperature == 1.0
        seen = {}
        out = []
        for p in prompts:
            i = seen[p[0]] = seen.get(p[0], -1) + 1
            text = self.answers[p[0]][i]
            out.append(Completion([1], [0.0], "eos", text))
        return out


def test_contamination_filter_drops_what_the_base_model_already_knows():
    rows = [{"question": "a?", "golden_answers": ["Oslo"]}, {"question": "bb?", "golden_answers": ["Lima"]},
            {"question": "ccc?", "golden_answers": ["Rome"]}]
    engine = MemoryEngine({2: ["no idea", "maybe oslo"], 3: ["Paris", "Bern"], 4: ["Rome.", "Rome"]})
    kept, dropped = contamination_filter(engine, FakeTokenizer(), rows, k=2, batch_size=2)
    assert kept == [rows[1]] and dropped == [rows[0], rows[2]]
    assert [p[0] for p in engine.prompts] == [2, 2, 3, 3, 4, 4]           # k adjacent samples per question


# ---- the answer judge over HTTP ------------------------------------------------------------------------

def test_parse_verdict():
    assert parse_verdict('<think>{"verdict": "correct"}</think> {"verdict": "INCORRECT"}') == "incorrect"
    assert parse_verdict("Correct.") == "correct" and parse_verdict("not correct") is None
    assert parse_verdict('<think>{"verdict": "correct"} and then the reply was cut') is None
    assert parse_verdict(None) is None and parse_verdict("") is None


@pytest.fixture
def judge_server():
    calls, auth = {}, []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            auth.append(self.headers.get("Authorization"))
            prediction = json.loads(body["messages"][1]["content"])["prediction"]
            calls[prediction] = calls.get(prediction, 0) + 1
            if prediction == "boom":
                self.send_response(500)
                self.end_headers()
                return
            content = {"right": '<think>Same city.</think>{"verdict": "correct"}',
                       "wrong": 'The verdict: {"verdict": "incorrect"}', "garbled": "I cannot tell.",
                       "flaky": "hmm" if calls[prediction] == 1 else "Correct", "notchat": None}[prediction]
            reply = {"choices": [{"message": {"content": content}}]}
            if prediction == "notchat" and calls[prediction] == 1:
                reply = {"object": "error", "message": "overloaded"}        # 200, but not a chat completion
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/v1", calls, auth
    server.shutdown()
    server.server_close()


def test_answer_judge_verdicts_retries_and_key(judge_server, monkeypatch):
    url, calls, auth = judge_server
    monkeypatch.setenv("JUDGE_TEST_KEY", "sekrit-123")
    judge = AnswerJudge(url, "judge-model", api_key_env="JUDGE_TEST_KEY", retries=2, backoff_s=0.0, concurrency=4)
    items = [("Capital of France?", ["Paris"], p) for p in ("right", "wrong", "garbled", "flaky", "boom", "notchat")]
    assert judge.judge(items) == ["correct", "incorrect", "unparseable", "correct", "error", "unparseable"]
    assert calls == {"right": 1, "wrong": 1, "garbled": 3, "flaky": 2, "boom": 3, "notchat": 3}   # asked again
    assert set(auth) == {"Bearer sekrit-123"}
    assert "sekrit" not in repr(vars(judge)) and judge.stats["unparseable"] == 2
    with pytest.raises(ValueError, match="http"):
        AnswerJudge("localhost:8000", "m")


# ---- trajectory records on the toy world -----------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """A small toy world written like `python toy_world.py --out DIR`: corpus, splits and an untrained tiny model."""
    world = tw.build_world(0, tw.WorldConfig(n_train=40, n_dev=10, n_test=20, n_extra_people=20))
    return tw.write_world(world, tmp_path_factory.mktemp("toy")), world


class TeacherEngine(ToyTeacherEngine):
    """Plays the toy teacher's turns as sampled ids; question `broken` gets a malformed turn (no </think>)."""

    def __init__(self, tokenizer, questions, broken):
        super().__init__(tokenizer, questions, premature_rate=0.0, wrong_search_rate=0.0)
        self.broken = broken

    def turn_text(self, question, k):
        if question == self.broken["question"]:
            return f"<OBSERVATION>guess</OBSERVATION><answer>{self.broken['golden_answers'][0]}</answer>"
        return super().turn_text(question, k)


def test_records_of_teacher_rollouts(toy_dir):
    from transformers import AutoTokenizer
    folder, world = toy_dir
    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    questions = [{**q, "benchmark": "test", "index": i} for i, q in enumerate(world.splits["test"][:4])]
    engine = TeacherEngine(tokenizer, questions, broken=questions[3])
    tools = Tools(BM25Retriever(folder / "corpus.jsonl"), topk=tw.TOPK, tokenizer=tokenizer)
    records = evaluate_questions(engine, tools, questions, tokenizer=tokenizer, params=SamplingParams(temperature=0),
                                 max_turns=6, max_context=2048, tool_names=tw.TOOLS, batch_size=3,
                                 rrm=ToyRRM("oracle"))
    for r, q in zip(records[:3], questions):
        assert (r["finish"], r["f1"], r["em"], r["answer"]) == ("answer", 1.0, 1.0, q["golden_answers"][0])
        assert r["tool_calls"] == len(r["turns"]) - 1 == len(q["metadata"]["hops"])
        assert all(t["tool_response"] for t in r["turns"][:-1]) and r["turns"][0]["tool_call"]["name"] == "web_search"
        atoms = [a for t in r["turns"] for a in t["atoms"]]
        assert r["n_atoms"] == len(atoms) == 4 * len(r["turns"])
        assert all(0 <= a["score"] <= 10 and a["reason"] for a in atoms) and 0 <= r["atr"] <= 1
    bad = records[3]
    assert (bad["finish"], bad["answer"], bad["f1"], bad["turns"]) == ("format_error", None, 0.0, [])
    assert bad["format_error"] and bad["golden_answers"][0] in bad["unparsed_turn"]

    # token statistics, recomputed from the rollout's ids and masks by another route
    trajs = __import__("search_env").rollout(engine, tools, questions, tokenizer=tokenizer,
                                             params=SamplingParams(temperature=0), max_turns=6, max_context=2048,
                                             tool_names=tw.TOOLS)
    for r, t in zip(records, trajs):
        runs = sampled_runs(t.ids, t.mask)
        assert r["response_tokens"] == sum(t.mask) == sum(map(len, runs))
        # tokens before the first one holding "</think>" (in the toy tokenizer that token is "</think>\n")
        assert r["think_tokens"] == sum(next((i for i, tok in enumerate(run) if "</think>" in tokenizer.decode([tok])),
                                             len(run)) for run in runs)
    assert 0 < records[0]["think_tokens"] < records[0]["response_tokens"]
    summary = aggregate(records)["test"]
    assert summary["atoms_per_turn"] == 4.0 and summary["finish"] == {"answer": 3, "format_error": 1}
    assert summary["f1"] == 0.75


def test_make_tools_picks_the_tools_of_the_retriever(toy_dir, monkeypatch, tmp_path):
    folder, _ = toy_dir
    assert make_tools(f"bm25:{folder / 'corpus.jsonl'}", tokenizer=None)[1] == ("web_search",)
    tools, names = make_tools("http://127.0.0.1:1/retrieve", tokenizer=None, topk=3,
                              query_cache=str(tmp_path / "cache.sqlite"), reader_url="http://r/v1", reader_model="m")
    assert names == ("web_search",) and tools.topk == 3 and (tmp_path / "cache.sqlite").is_file()
    assert tools.reader.base == "http://r/v1" and tools.reader.model == "m"
    monkeypatch.setenv("SERPER_API_KEY", "x")
    assert make_tools("serper", tokenizer=None)[1] == ("web_search", "browse_webpage")
    with pytest.raises(ValueError, match="bm25:CORPUS"):
        make_tools("elastic", tokenizer=None)


# ---- the command, end to end ---------------------------------------------------------------------------

def finite_numbers(obj):
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite_numbers(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def test_cli_on_the_toy_world(toy_dir, tmp_path):
    folder, _ = toy_dir
    with open(folder / "test.jsonl", "a") as f:               # two bad rows after the 60 good ones
        f.write('{"id": "x", "question": "Who?", "golden_answers": []}\n{oops\n')
    out, training = tmp_path / "run", tmp_path / "training"             # training: the model's train.py --out
    training.mkdir()
    (training / "metrics.jsonl").write_text("".join(json.dumps({"step": k, "reward": 0.1 * k, "f1": 0.2 * k}) + "\n"
                                                    for k in (1, 2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "evaluate.py", "--toy", "--data-dir", str(folder), "--out", str(out),
                           "--limit", "3", "--engine", "hf", "--max-new-tokens", "12", "--max-turns", "2",
                           "--curves", str(training)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{folder / 'test.jsonl'}:61: 'golden_answers'" in proc.stderr and ":62: not valid JSON" in proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    test = metrics["benchmarks"]["test"]
    assert (test["n"], test["available"], test["bad_rows"]) == (3, 60, 2)
    assert finite_numbers(metrics) and sum(test["finish"].values()) == 3 and test["response_tokens"] > 0
    records = load_records(out / "trajectories.jsonl")
    assert len(records) == 3 and all(r["benchmark"] == "test" and "turns" in r and "f1" in r for r in records)
    page = (out / "report.html").read_text()
    assert page.count("<details ") == 3 and page.count('<img alt="') == 2
    assert (out / "curves.png").exists() and sorted(p.name for p in training.iterdir()) == ["metrics.jsonl"]
    assert "| method | test |" in proc.stdout and "| test | 3 |" in proc.stdout


def test_curves_that_cannot_be_drawn_cost_the_report_its_curves_not_the_evaluation(toy_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    import evaluate
    folder, _ = toy_dir
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")

    def broken(run, into=None):
        raise RuntimeError("matplotlib fell over")
    monkeypatch.setattr(evaluate, "plot_run", broken)
    out = tmp_path / "eval"
    main(["--toy", "--data-dir", str(folder), "--out", str(out), "--limit", "1", "--engine", "hf",
          "--max-new-tokens", "8", "--max-turns", "1", "--curves", str(tmp_path)])
    assert "warning: --curves: not drawn (RuntimeError: matplotlib fell over)" in capsys.readouterr().err
    page = (out / "report.html").read_text()
    assert page.count("<details ") == 1 and "<img" not in page and len(load_records(out / "trajectories.jsonl")) == 1


@pytest.mark.parametrize("lines", [None, "", '{"step": 0, "eval": {}}\n'])
def test_curves_of_a_run_without_grpo_steps_are_refused_before_evaluating(tmp_path, capsys, lines):
    if lines is not None:
        (tmp_path / "metrics.jsonl").write_text(lines)
    with pytest.raises(SystemExit):
        parse_args(["--toy", "--out", str(tmp_path / "out"), "--curves", str(tmp_path)])
    assert f"--curves: {tmp_path / 'metrics.jsonl'}" in capsys.readouterr().err


def test_hostile_rows_cost_their_benchmark_those_rows_not_the_run(toy_dir, tmp_path, capsys):
    """Issue 16: a 10 MB question, a prompt over max_context (toy: 1024), a huge golden answer and a lone surrogate
    are bad rows with file:line; the rest of that benchmark and the other benchmarks are evaluated and written."""
    folder, _ = toy_dir
    good = (folder / "test.jsonl").read_text().splitlines()[:2]
    hostile = [good[0],
               json.dumps({"id": "big", "question": "x" * 10_000_000, "golden_answers": ["a"]}),
               json.dumps({"id": "long", "question": "x y " * 900, "golden_answers": ["a"]}),   # 3,600 characters
               json.dumps({"id": "gold", "question": "Who?", "golden_answers": ["a" * 5000]}),
               '{"id": "sur", "question": "Who\\ud800?", "golden_answers": ["a"]}',
               good[1]]
    (folder / "hostile.jsonl").write_text("\n".join(hostile) + "\n")
    (folder / "allbad.jsonl").write_text(hostile[2] + "\n")
    out = tmp_path / "run"
    main(["--toy", "--data-dir", str(folder), "--out", str(out), "--benchmarks", "test,hostile,allbad", "--limit", "2",
          "--engine", "hf", "--max-new-tokens", "8", "--max-turns", "1"])
    err = capsys.readouterr().err
    where = folder / "hostile.jsonl"
    assert f"{where}:2: line of 10000" in err and f"{where}:4: a golden answer has 5000 characters" in err
    assert f"{where}:3: prompt is " in err and "max_context is 1024 (--max-context)" in err
    assert f"{where}:5: holds text that is not valid Unicode" in err and f"{folder / 'allbad.jsonl'}:1: prompt" in err
    benchmarks = json.loads((out / "metrics.json").read_text())["benchmarks"]
    assert [(name, m["n"], m["bad_rows"]) for name, m in benchmarks.items() if name != "test"] == \
        [("hostile", 2, 4), ("allbad", 0, 1)] and benchmarks["test"]["n"] == 2
    records = load_records(out / "trajectories.jsonl")
    assert [r["benchmark"] for r in records] == ["test", "test", "hostile", "hostile"]
    assert (out / "report.html").read_text().count("<details ") == 4


@pytest.mark.skipif(not os.environ.get("ATOM_REAL_DATA"), reason="set ATOM_REAL_DATA to the shared data folder")
def test_real_data_seven_benchmarks(toy_dir, tmp_path, monkeypatch, capsys):
    data = Path(os.environ["ATOM_REAL_DATA"])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))   # the BM25 index, if the data is read-only
    folder, _ = toy_dir
    names = ["nq", "triviaqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle", "popqa"]
    main(["--model", str(folder / "model"), "--data-dir", str(data), "--retriever", f"bm25:{data / 'corpus.jsonl'}",
          "--out", str(tmp_path / "real"), "--limit", "2", "--engine", "hf", "--max-new-tokens", "8",
          "--max-turns", "1", "--benchmarks", ",".join(names)])
    printed = capsys.readouterr().out
    table1 = [line for line in printed.splitlines() if line.startswith("| method |")][0]
    assert table1 == "| method | NQ | TQ | HotpotQA | 2Wiki | MuSiQue | Bamboogle | PopQA |"
    stats = [line for line in printed.splitlines() if line.split(" | ")[0][2:] in names]
    assert len(stats) == 7 and all(line.split(" | ")[1] == "2" for line in stats)
    metrics = json.loads((tmp_path / "real" / "metrics.json").read_text())
    assert list(metrics["benchmarks"]) == names and finite_numbers(metrics)
    assert all(m["n"] == 2 and m["bad_rows"] == 0 for m in metrics["benchmarks"].values())
    assert len(load_records(tmp_path / "real" / "trajectories.jsonl")) == 14
