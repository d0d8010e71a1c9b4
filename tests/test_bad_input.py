"""Hostile input (issue 16): each fix is tested against a class of inputs, not one example.

1. tool-call JSON: huge numbers, deep brackets, odd escapes, lone surrogates -> a `Turn` or `FormatError`.
2. judge replies: a verdict whose strings quote `<think>`/`</think>`, braces or code fences still parses.
3. data loading: an over-long question / golden answer / line is a bad row (file:line), never allocated; so is a
   prompt that leaves no room to generate within max_context (3b), and text that is not valid Unicode (3c).
4. report.py: every value of a hand-edited trajectories.jsonl reaches the HTML escaped.
"""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from atomic_thought import FormatError, Turn, parse_turn

THINK = "<think>\n<OBSERVATION> seen </OBSERVATION>\n</think>\n"


# ---------------------------------------------------------------- 1. tool-call JSON
def _digits(n):
    return "1" * n


_json_atom = st.one_of(
    st.integers(min_value=4000, max_value=20000).map(_digits),                 # > int-to-str digit limit
    st.integers(min_value=1, max_value=400).map(lambda n: "1e" + "9" * n),      # float overflow -> inf
    st.integers(min_value=1, max_value=50000).map(lambda n: "[" * n + "]" * n),  # deep brackets
    st.integers(min_value=1, max_value=50000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(min_value=1, max_value=50000).map(lambda n: "[" * n),           # unclosed deep brackets
    st.sampled_from(['"\\ud800"', '"\\udfff\\ud800"', '"\\u00"', '"\\x41"', '"\\"', '"\\\\u12"', "NaN",
                     "-Infinity", '"\\u0000"', "\"\ud800\"", '"\x00"', "1_000", "0x10", "--1", "\"\\/\"",
                     '"' + "\\" * 3 + '"']),
    st.text(max_size=30).map(json.dumps),
    st.text(max_size=30),                                                       # anything, incl. surrogates
)


def _tool_body(value, slot):
    if slot == "raw":
        return value
    if slot == "name":
        return '{"name": %s, "arguments": {"query": "q"}}' % value
    if slot == "query":
        return '{"name": "web_search", "arguments": {"query": %s}}' % value
    if slot == "url_list":
        return '{"name": "browse_webpage", "arguments": {"url_list": [%s], "query": "q"}}' % value
    return '{"name": "web_search", "arguments": %s}' % value


@settings(max_examples=200, deadline=None)
@given(_json_atom, st.sampled_from(["raw", "name", "query", "url_list", "arguments"]))
def test_tool_call_json_fails_only_with_format_error(value, slot):
    text = THINK + "<tool_call>\n" + _tool_body(value, slot) + "\n</tool_call>"
    try:
        turn = parse_turn(text)
    except FormatError as e:
        assert isinstance(str(e), str) and len(str(e)) < 2000  # a short message, even for 50k-deep input
    else:
        assert isinstance(turn, Turn) and turn.tool_call is not None


def test_five_thousand_digit_integer_is_a_format_error():
    body = '{"name": "web_search", "arguments": {"query": %s}}' % ("7" * 5000)
    try:
        parse_turn(THINK + "<tool_call>\n" + body + "\n</tool_call>")
    except FormatError as e:
        assert "invalid tool-call JSON" in str(e)
    else:
        raise AssertionError("a 5,000-digit integer must not parse")


def test_deep_list_argument_error_message_does_not_recurse():
    import sys
    n = sys.getrecursionlimit() - 60  # decodes, but its repr may not
    body = '{"name": "web_search", "arguments": {"query": %s}}' % ("[" * n + "]" * n)
    try:
        parse_turn(THINK + "<tool_call>\n" + body + "\n</tool_call>")
    except FormatError:
        pass
    else:
        raise AssertionError("a nested list is not a query string")


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["\\ud800", "\\udfff", "\\ude00\\ud83d", "a\\udc80b", "\\ud83d"]),
       st.sampled_from(["query", "url_list"]), st.booleans())
def test_a_lone_surrogate_in_a_tool_argument_is_a_format_error(escape, slot, with_text):
    """JSON decodes "\\ud800" to a lone surrogate: no tokenizer, search API or UTF-8 trajectories.jsonl takes it."""
    value = '"%s%s"' % ("q " if with_text else "", escape)
    body = _tool_body(value, slot)
    try:
        parse_turn(THINK + "<tool_call>\n" + body + "\n</tool_call>", tools=("web_search", "browse_webpage"))
    except FormatError as e:
        assert "valid Unicode" in str(e)
    else:
        raise AssertionError(f"{body} must not parse")
    pair = _tool_body('"q \\ud83d\\ude00"', slot)                         # a valid pair (an emoji) is fine
    turn = parse_turn(THINK + "<tool_call>\n" + pair + "\n</tool_call>", tools=("web_search", "browse_webpage"))
    json.dumps(turn.tool_call.arguments, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- 2. judge replies quoting tags
from evaluate import parse_verdict  # noqa: E402
from rrm_reward import JudgeReplyError, parse_judge_reply  # noqa: E402

NONCE = "0123456789ab"
_quoted = st.lists(st.sampled_from(["</think>", "<think>", "{", "}", "```", "```json", '"', "\\", "\n", "</think>\n",
                                    "{\"id\": \"%s\"" % NONCE, "x"]), max_size=8).map("".join)


def _judge(reasons):
    return json.dumps({"id": NONCE, "scores": [{"atom": i + 1, "score": i, "reason": r}
                                               for i, r in enumerate(reasons)]})


@settings(max_examples=200, deadline=None)
@given(st.lists(_quoted, min_size=1, max_size=3), st.booleans(), st.booleans(), _quoted)
def test_judge_verdict_with_quoted_tags_parses(reasons, think, fence, draft_reason):
    body = _judge(reasons)
    if fence:
        body = f"```json\n{body}\n```"
    # A draft verdict inside the reasoning (all scores 9, its reason quoting tags too) is ignored.
    draft = json.dumps({"id": NONCE, "scores": [{"score": 9, "reason": draft_reason}] * len(reasons)})
    reply = f"<think>\nDraft: {draft}\n</think>\n{body}" if think else body
    scores, got = parse_judge_reply(reply, len(reasons), NONCE)
    assert scores == tuple(float(i) for i in range(len(reasons)))
    assert got == tuple(r[:300] for r in reasons)


@settings(max_examples=100, deadline=None)
@given(_quoted)
def test_unclosed_think_is_still_a_truncated_reply(reason):
    reply = "<think>\nAtom 1 is fine. " + _judge([reason])      # never closed, even if the JSON quotes </think>
    try:
        parse_judge_reply(reply, 1, NONCE)
    except JudgeReplyError as e:
        assert "never closed" in str(e)
    else:
        raise AssertionError("a reply cut off inside <think> must not parse")
    assert parse_verdict("<think>" + json.dumps({"verdict": "correct", "reason": reason})) is None


@settings(max_examples=200, deadline=None)
@given(_quoted, st.sampled_from(["correct", "incorrect"]), st.booleans())
def test_answer_verdict_with_quoted_tags_parses(reason, verdict, think):
    body = json.dumps({"verdict": verdict, "reason": reason})
    other = "incorrect" if verdict == "correct" else "correct"
    reply = f'<think>{{"verdict": "{other}"}} hmm</think>\n```json\n{body}\n```' if think else body
    assert parse_verdict(reply) == verdict


# ---------------------------------------------------------------- 3. over-long questions are bad rows
import tracemalloc  # noqa: E402

import pytest  # noqa: E402

from qa_data import MAX_QUESTION_CHARS, line_limit, load_benchmark, load_jsonl_questions, load_questions  # noqa: E402


def _row(i, question="Who wrote Hamlet?", golds=("Shakespeare",)):
    return json.dumps({"id": f"q{i}", "question": question, "golden_answers": list(golds)})


BIG = 10 * 1000 * 1000


@pytest.fixture
def hostile_file(tmp_path):
    lines = [
        _row(1),
        _row(2, question="x" * BIG),                                   # 2: a 10 MB line (over the byte bound)
        _row(3),
        _row(4, question="y" * (MAX_QUESTION_CHARS + 1)),              # 4: within the byte bound, over the chars
        _row(5, golds=["ok", "z" * (MAX_QUESTION_CHARS + 1)]),         # 5: a huge golden answer
        _row(6, golds=["a"] * 5000),                                   # 6: too many golden answers
        _row(7, question="\\u00e9" * 10),                              # fine (escaped in the file)
        '{"id": "q8", "question": ' + "7" * 5000 + ', "golden_answers": ["a"]}',   # 8: a 5,000-digit int
        '{"id": "q9", "question": ' + "[" * 100000,                    # 9: deep brackets
        _row(10, question="Q" * MAX_QUESTION_CHARS),                   # exactly at the limit: fine
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_over_long_rows_are_reported_with_file_and_line_and_never_allocated(hostile_file):
    tracemalloc.start()
    try:
        rows, bad = load_jsonl_questions(hostile_file)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r["id"] for r in rows] == ["q1", "q3", "q7", "q10"]
    assert [b.split(": ", 1)[0] for b in bad] == [f"{hostile_file}:{n}" for n in (2, 4, 5, 6, 8, 9)]
    assert "more than the limit" in bad[0] and "--max-question-chars" in bad[0]
    assert "'question' has 4001 characters" in bad[1] and "golden answer has 4001" in bad[2]
    assert all(len(b) < 400 for b in bad)                              # messages stay short
    assert peak < 3 * line_limit(), peak                               # ~1 MiB, not the 10 MB line


@pytest.mark.parametrize("limit", [50, 4000, 20000])
def test_the_limit_is_configurable_and_bounds_questions_and_answers(tmp_path, limit):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join([_row(1, question="q" * limit), _row(2, question="q" * (limit + 1)),
                               _row(3, golds=["g" * (limit + 1)])]) + "\n")
    rows, bad = load_benchmark("b", tmp_path, max_question_chars=limit)
    assert [r["id"] for r in rows] == ["q1"] and [b.split(": ")[0] for b in bad] == [f"{path}:2", f"{path}:3"]
    assert [r["id"] for r in load_questions(str(path), max_question_chars=limit)] == ["q1"]


def test_a_file_without_a_final_newline_and_a_long_last_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes((_row(1) + "\n" + _row(2, question="x" * (2 * line_limit()))).encode())
    rows, bad = load_jsonl_questions(path)
    assert [r["id"] for r in rows] == ["q1"] and bad[0].startswith(f"{path}:2: line of ")


@pytest.mark.parametrize("script,extra", [("evaluate.py", ["--out", "o", "--model", "m", "--retriever", "x"]),
                                          ("train.py", []), ("teacher_data.py", ["--out", "o"])])
def test_flag_rejects_non_positive_limits(script, extra):
    import importlib
    module = importlib.import_module(script[:-3])
    with pytest.raises(SystemExit):
        module.parse_args(extra + ["--max-question-chars", "0"])
    assert module.parse_args(extra + ["--max-question-chars", "123"]).max_question_chars == 123


# ---------------------------------------------------------------- 3b. prompts that leave no room to generate
import toy_world as tw  # noqa: E402
from atomic_thought import system_prompt  # noqa: E402
from qa_data import prompt_check  # noqa: E402
from search_env import prompt_ids  # noqa: E402


@pytest.fixture(scope="module")
def toy_tokenizer():
    return tw.build_tokenizer(tw.build_world(0))


# Text of every kind the byte bound must hold for: multi-byte characters, emoji, whitespace runs, and strings the
# template or tokenizer treats specially.
_PIECES = ["word", " ", "\n", "\t\t", "東京", "é", "🙂", "<|im_end|>", "<|im_start|>", "<think>", "</tool_call>",
           "x" * 40, "  \n\n  ", "\u200b", "ﬁ"]
_question = st.one_of(st.lists(st.sampled_from(_PIECES), max_size=60).map("".join),
                      st.text(st.characters(exclude_categories=("Cs",)), max_size=300))


@settings(max_examples=120, deadline=None)
@given(_question, st.integers(-30, 30))
def test_prompt_check_agrees_with_the_exact_token_count(toy_tokenizer, question, offset):
    n = len(prompt_ids(toy_tokenizer, question, tw.SYSTEM))
    max_context = max(1, n + offset)
    problem = prompt_check(toy_tokenizer, tw.SYSTEM, max_context)({"question": question})
    assert (problem is None) == (n < max_context), (n, max_context, problem)
    if problem:
        assert problem == f"prompt is {n:,} tokens, max_context is {max_context} (--max-context): no room to generate"


def test_rows_whose_prompt_does_not_fit_are_bad_rows_with_file_and_line(tmp_path, toy_tokenizer):
    system = system_prompt(("web_search",))                 # the real run's prompt (run_setup.prompt_fit)
    fit = "Who wrote" + " Hamlet" * 30
    over = fit + " Hamlet"
    max_context = len(prompt_ids(toy_tokenizer, over, system))          # `over` fills it exactly: no room left
    assert len(prompt_ids(toy_tokenizer, fit, system)) < max_context
    lines = [_row(1), _row(2, question=over), _row(3, question=fit), _row(4, question="東京 " * 400),
             _row(5, question="x" * BIG), _row(6, question="z" * (MAX_QUESTION_CHARS + 1)), _row(7)]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(lines) + "\n")
    from run_setup import prompt_fit
    for check in (prompt_check(toy_tokenizer, system, max_context), prompt_fit(toy_tokenizer, "bm25:x", max_context)):
        rows, bad = load_jsonl_questions(path, check=check)
        assert [r["id"] for r in rows] == ["q1", "q3", "q7"]
        assert [b.split(": ")[0] for b in bad] == [f"{path}:{n}" for n in (2, 4, 5, 6)]
        assert f"prompt is {max_context:,} tokens, max_context is {max_context} (--max-context)" in bad[0]
        assert "prompt is" in bad[1] and "line of" in bad[2] and "'question' has" in bad[3]  # never tokenized
    assert [r["id"] for r in load_questions(str(path), check=check)] == ["q1", "q3", "q7"]


def test_at_the_paper_limits_no_row_is_tokenized(monkeypatch, toy_tokenizer):
    import search_env
    calls = []
    monkeypatch.setattr(search_env, "prompt_ids", lambda *a: calls.append(a) or [0])
    check = prompt_check(toy_tokenizer, system_prompt(("web_search", "browse_webpage")), 32768)
    assert check({"question": "🙂" * MAX_QUESTION_CHARS}) is None and calls == []      # 16,000 bytes: fits
    check = prompt_check(toy_tokenizer, tw.SYSTEM, 64)
    assert check({"question": "Who?"}) is None and len(calls) == 1     # it might not fit: counted exactly


def test_train_setup_skips_rows_that_do_not_fit_naming_file_and_line(tmp_path, capsys):
    """train.py's real path (run_setup.setup_real): --data and --eval-data rows too long for --max-question-chars or
    --max-context are warned about and skipped, the others kept."""
    import train
    from distributed import Dist
    from run_setup import setup_real
    world = tw.write_world(tw.build_world(0, tw.WorldConfig(n_train=6, n_dev=2, n_test=4, n_extra_people=2)),
                           tmp_path / "w")
    good = (world / "train.jsonl").read_text().splitlines()
    data, held_out = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    data.write_text("\n".join(good[:2] + [_row(3, question="x y " * 240), _row(4, question="x" * 1001)]) + "\n")
    held_out.write_text("\n".join((world / "test.jsonl").read_text().splitlines()[:2] + [_row(3, "x y " * 240)]) + "\n")
    args = train.parse_args(["--model", str(world / "model"), "--data", str(data), "--eval-data", str(held_out),
                             "--retriever", f"bm25:{world / 'corpus.jsonl'}", "--reward", "outcome", "--stage", "grpo",
                             "--max-context", "1024", "--max-question-chars", "1000", "--engine", "hf",
                             "--out", str(tmp_path / "out")])
    env = setup_real(args, Dist(), needs_sft_data=False)
    assert len(env["train"]) == 2 and len(env["test"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:3: prompt is " in err and "max_context is 1024 (--max-context)" in err and f"{held_out}:3: " in err
    assert f"{data}:4: 'question' has 1001 characters, more than the limit of 1000 (--max-question-chars)" in err


# ---------------------------------------------------------------- 3c. text that cannot be tokenized or written back
@pytest.mark.parametrize("line", [
    '{"id": "s", "question": "a\\ud800b", "golden_answers": ["x"]}',            # a lone high surrogate
    '{"id": "s", "question": "q", "golden_answers": ["x", "\\udfff"]}',        # a lone low one, in an answer
    '{"id": "\\udc80", "question": "q", "golden_answers": ["x"]}',
    '{"id": "s", "question": "q", "golden_answers": ["x"], "metadata": {"m": ["\\ud83d"]}}',
    '{"id": "s", "question": "\\ude00\\ud83d", "golden_answers": ["x"]}',      # a pair in the wrong order
])
def test_lone_surrogates_are_bad_rows(tmp_path, line):
    path = tmp_path / "b.jsonl"
    good = '{"id": "q1", "question": "\\ud83d\\ude00 ok", "golden_answers": ["x"]}'   # a valid pair: an emoji
    path.write_text(good + "\n" + line + "\n")
    rows, bad = load_jsonl_questions(path)
    assert [r["id"] for r in rows] == ["q1"] and len(bad) == 1
    assert bad[0].startswith(f"{path}:2: holds text that is not valid Unicode"), bad


_field = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                   st.lists(st.text(max_size=8), max_size=3), st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
_line = st.one_of(                                          # raw lines: JSON rows of any shape, bytes, hostile JSON
    st.fixed_dictionaries({"question": st.one_of(st.text(max_size=40), _field)},
                          optional={"golden_answers": st.one_of(st.lists(st.text(max_size=10), max_size=3), _field),
                                    "id": _field, "metadata": _field}).map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=60),
    st.sampled_from([b'{"question": "\\ud800", "golden_answers": ["a"]}', b"[" * 3000, b"7" * 5000, b"{}", b"null",
                     b'{"question": "q", "golden_answers": ["a"], "id": 1e999}', b"\xff\xfe", b"\x00"]))


@settings(max_examples=100, deadline=None)
@given(st.lists(_line, max_size=6))
def test_any_file_loads_into_rows_that_tokenize_and_write_back(tmp_path_factory, toy_tokenizer, lines):
    path = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    data = b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines)
    path.write_bytes(data)
    rows, bad = load_jsonl_questions(path, check=prompt_check(toy_tokenizer, tw.SYSTEM, 1024))
    assert len(rows) + len(bad) == sum(1 for line in data.split(b"\n") if line.strip())
    assert all(b.startswith(f"{path}:") for b in bad)
    for row in rows:
        prompt_ids(toy_tokenizer, row["question"], tw.SYSTEM)
        json.dumps(row, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- 4. report.py on hand-edited records
import html.parser  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from report import read_run, render_report  # noqa: E402

# The report's own elements (report.py's templates); anything else in a page came from the data.
OWN_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "thead", "tbody", "tr", "th",
            "td", "div", "span", "details", "summary", "b", "code", "pre", "label", "select", "option", "script"}
MARKUP = ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", '"><svg onload=alert(3)>', "<!--",
          "<b>", "&amp;", "</details></div><iframe>", "'", "<marquee", "\u2028"]
_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.sampled_from(MARKUP), st.text(max_size=12))
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.sampled_from(MARKUP + ["tag", "text"]),
                                                                       inner, max_size=3)), max_leaves=8)
_atom = st.one_of(_value, st.fixed_dictionaries({}, optional={k: _value for k in ("tag", "text", "score", "reason")}))
_turn = st.one_of(_value, st.fixed_dictionaries({}, optional={
    "atoms": st.one_of(_value, st.lists(_atom, max_size=3)), "think": _value,
    "tool_call": st.one_of(_value, st.fixed_dictionaries({}, optional={"name": _value, "arguments": _value})),
    "tool_response": _value, "answer": _value}))
FIELDS = ("benchmark", "question", "golden_answers", "answer", "f1", "em", "finish", "judge", "atr", "format_error",
          "unparsed_turn", "tool_calls", "response_tokens", "think_tokens", "id", "index")
_record = st.one_of(_value, st.fixed_dictionaries({}, optional={
    **{k: _value for k in FIELDS}, "turns": st.one_of(_value, st.lists(_turn, max_size=3))}))


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]

    handle_startendtag = handle_starttag


def _assert_only_own_markup(page):
    parser = Tags()
    parser.feed(page)
    parser.close()
    assert set(parser.tags) <= OWN_TAGS, set(parser.tags) - OWN_TAGS
    assert parser.tags.count("script") == 2
    assert set(parser.attrs) <= {"lang", "charset", "class", "style", "title", "id", "type", "value", "data-benchmark",
                                 "data-outcome", "data-finish"}, parser.attrs


@settings(max_examples=150, deadline=None)
@given(st.lists(_record, max_size=4), st.one_of(_value, st.fixed_dictionaries(
    {}, optional={"benchmarks": st.one_of(_value, st.dictionaries(st.sampled_from(MARKUP + ["nq"]), _value,
                                                                  max_size=2)),
                  "config": st.one_of(_value, st.dictionaries(st.sampled_from(["model", "seed"]), _value))})))
def test_report_of_fuzzed_records_holds_only_its_own_markup(records, metrics):
    _assert_only_own_markup(render_report(metrics, records))


def test_report_cli_names_file_and_line_of_a_bad_record(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"benchmarks": {}, "config": {"model": "<b>m</b>"}}))
    lines = [json.dumps({"question": "ok", "f1": "<img src=x>", "tool_calls": "<script>x</script>", "turns": 3}),
             "{not json", json.dumps(["<img src=y>"]), "", '{"f1": ' + "9" * 5000 + "}"]
    (tmp_path / "trajectories.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert f"{tmp_path / 'trajectories.jsonl'}:2: not valid JSON" in out.stderr
    assert f"{tmp_path / 'trajectories.jsonl'}:5: not valid JSON" in out.stderr
    page = (tmp_path / "report.html").read_text()
    _assert_only_own_markup(page)
    assert "malformed record at trajectories.jsonl:3" in page and "malformed turn 1" in page
    assert read_run(tmp_path)[2] == ["trajectories.jsonl:1", "trajectories.jsonl:3"]


def test_report_cli_with_an_unreadable_metrics_file_exits_with_its_name(tmp_path):
    (tmp_path / "metrics.json").write_text("{")
    (tmp_path / "trajectories.jsonl").write_text("")
    out = subprocess.run([sys.executable, str(Path(__file__).parent.parent / "report.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "metrics.json: cannot read it" in out.stderr and "Traceback" not in out.stderr
