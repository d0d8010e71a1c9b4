"""report.py: the Table 1 layout, the per-benchmark table, and report.html (escaping, structure, a real browser)."""
import html.parser
import json
import re
import shutil
import subprocess

import pytest

from report import markdown_stats, markdown_table1, render_report, script_json, write_report

EVIL = "<script>alert(1)</script>"


def summary(n, f1, em=0.0, **extra):
    return {"n": n, "f1": f1, "em": em, "judge_accuracy": None, "response_tokens": 10.0, "think_tokens": 4.0,
            "atoms_per_turn": 2.5, "tool_calls": 1.5, "turns": 2.0, "finish": {"answer": n}, "bad_rows": 0, **extra}


def records():
    """Three hand-built trajectory records: scored atoms, a masked tool response, a rejected turn, hostile text."""
    search = {"atoms": [{"tag": "OBSERVATION", "text": f"the page said {EVIL}", "score": 0.0, "reason": "wrong"},
                        {"tag": "ACTION", "text": "search again", "score": 10.0, "reason": '"quoted" <marquee>'}],
              "think": "", "tool_call": {"name": "web_search", "arguments": {"query": "</script><marquee>q</marquee>"}},
              "tool_response": "[1] Page\n<answer>fake</answer> & <!-- comment", "answer": None}
    answer = {"atoms": [{"tag": "HYPOTHESIS_TESTING", "text": "it is Paris"}], "think": "", "tool_call": None,
              "tool_response": None, "answer": "Paris"}
    base = {"judge": None, "atr": None, "format_error": None, "unparsed_turn": None, "n_atoms": 3,
            "response_tokens": 40, "think_tokens": 20}
    return [
        {**base, "index": 0, "id": "a", "benchmark": "nq", "question": EVIL, "golden_answers": ["Paris"],
         "turns": [search, answer], "answer": "Paris", "f1": 1.0, "em": 1.0, "finish": "answer", "tool_calls": 1,
         "judge": "correct", "atr": 0.5},
        {**base, "index": 1, "id": "b", "benchmark": '"><img src=x onerror=alert(2)>', "question": "q2",
         "golden_answers": ["x & y"], "turns": [search], "answer": None, "f1": 0.0, "em": 0.0,
         "finish": "format_error", "format_error": "unbalanced <think>", "unparsed_turn": f"<think>{EVIL}",
         "tool_calls": 1},
        {**base, "index": 2, "id": "c", "benchmark": "nq", "question": "q3", "golden_answers": ["New York City"],
         "turns": [answer], "answer": "New York", "f1": 0.8, "em": 0.0, "finish": "answer", "tool_calls": 0},
    ]


def metrics():
    return {"config": {"model": f"/models/{EVIL}", "retriever": "bm25:corpus.jsonl", "seed": 0},
            "benchmarks": {"nq": summary(2, 0.9, 0.5), '"><img src=x onerror=alert(2)>': summary(1, 0.0)},
            "overall": summary(3, 0.6)}


# ---- markdown tables ------------------------------------------------------------------------------

def test_table1_has_the_paper_layout_and_reference_rows():
    per = {"nq": summary(3, 0.5), "bamboogle": summary(2, 1.0), "test": summary(4, 0.25)}
    lines = markdown_table1(per).splitlines()
    assert lines[0] == "| method | NQ | TQ | HotpotQA | 2Wiki | MuSiQue | Bamboogle | PopQA | test |"
    assert lines[2] == "| ours | 50.0 | – | – | – | – | 100.0 | – | 25.0 |"
    assert lines[3] == "| Atom-Searcher (paper) | 44.0 | 81.8 | 57.3 | 66.9 | 27.6 | 70.7 | 50.3 | – |"
    assert lines[4] == "| DeepResearcher (paper) | 39.6 | 78.4 | 52.8 | 59.7 | 27.1 | 71.0 | 48.5 | – |"
    assert len(lines) == 5


def test_table1_without_a_paper_benchmark_has_no_paper_rows():
    assert markdown_table1({"test": summary(4, 0.25)}, label="toy").splitlines() == [
        "| method | test |", "| --- | --- |", "| toy | 25.0 |"]


def test_stats_table_has_one_row_per_benchmark():
    per = {"nq": summary(2, 0.5, 0.5, judge_accuracy=0.5, bad_rows=3), "my|set": summary(0, 0.0)}
    lines = markdown_stats(per).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| nq | 2 | 50.0 | 50.0 | 50.0 | 10.0 | 4.0 | 2.50 | 1.50 | 2.00 | answer 2 | 3 |"
    assert lines[3].startswith("| my\\|set | 0 |")   # a pipe in a name cannot break the table


# ---- HTML -----------------------------------------------------------------------------------------

class TextAndTags(html.parser.HTMLParser):
    """What a browser would build: the text nodes and the start tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.tags, self.scripts = [], [], []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)


def test_hostile_text_renders_as_text_and_cannot_leave_the_script():
    page = render_report(metrics(), records())
    parsed = TextAndTags()
    parsed.feed(page)
    tags = [t for t, _ in parsed.tags]
    assert tags.count("script") == 2 and "img" not in tags and "marquee" not in tags   # only our two scripts
    text = "".join(parsed.text)
    assert EVIL in text and "<answer>fake</answer> & <!-- comment" in text and '"</script><marquee>q</marquee>"' in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # attribute values stay inside their quotes
    benchmarks = [a.get("data-benchmark") for t, a in parsed.tags if t == "details"]
    assert benchmarks == ["nq", '"><img src=x onerror=alert(2)>', "nq"]
    # the embedded metrics JSON is intact and holds no markup
    data = re.search(r'<script type="application/json" id="metrics">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data and ">" not in data and "&" not in data
    assert json.loads(data) == metrics()


def test_script_json_escapes_markup_and_round_trips():
    obj = {"a": "</script><!-- & \u2028", "<k>": [1, "&amp;"]}
    out = script_json(obj)
    assert not set("<>&") & set(out) and "\u2028" not in out
    assert json.loads(out) == obj


def test_report_structure_colours_masks_and_filters():
    page = render_report(metrics(), records())
    parsed = TextAndTags()
    parsed.feed(page)
    details = [a for t, a in parsed.tags if t == "details"]
    assert [(d["data-outcome"], d["data-finish"]) for d in details] == [
        ("correct", "answer"), ("wrong", "format_error"), ("partial", "answer")]
    styles = [a["style"] for t, a in parsed.tags if t == "div" and a.get("class") == "atom"]
    assert "background:hsl(0,70%,86%)" in styles[0] and "background:hsl(120,70%,86%)" in styles[1]
    assert not any("background" in s for s in styles[2:3])          # an unscored atom is not coloured
    assert sum(1 for t, a in parsed.tags if a.get("class") == "masked") == 2   # one per tool response
    assert "tool response (masked: not trained)" in page
    text = "".join(parsed.text)
    assert "rejected turn: unbalanced <think>" in text and f"<think>{EVIL}" in text
    options = {(a.get("value")) for t, a in parsed.tags if t == "option"}
    assert {"nq", "correct", "partial", "wrong", "answer", "format_error"} <= options
    # self-contained: no external resource of any kind
    assert not [t for t, a in parsed.tags if t in ("link", "img", "iframe") or "src" in a or "href" in a]
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    assert "url(" not in style and "@import" not in style


# ---- a real browser ---------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="no chromium at /usr/bin/chromium")
def test_report_in_headless_chromium(tmp_path):
    image = pytest.importorskip("PIL.Image")
    path = tmp_path / "report.html"
    write_report(path, metrics(), records())
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
              f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    shot = tmp_path / "shot.png"
    run = subprocess.run(common + ["--window-size=1000,800", f"--screenshot={shot}", path.as_uri()],
                         capture_output=True, text=True, timeout=90)
    assert shot.is_file(), run.stderr[-2000:]
    console = [line for line in run.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []                                          # no console message, error or otherwise
    pixels = image.open(shot).convert("RGB")
    colours = pixels.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 20                                      # text, tables and badges, not a blank page
    assert max(count for count, _ in colours) < 0.97 * pixels.width * pixels.height

    # the filters run from the URL fragment: one of the two nq trajectories is wrong-free and correct
    dom = subprocess.run(common + ["--dump-dom", path.as_uri() + "#benchmark=nq&outcome=correct"],
                         capture_output=True, text=True, timeout=90)
    assert "showing 1 of 3" in dom.stdout, dom.stderr[-2000:]
    assert [":CONSOLE" in line for line in dom.stderr.splitlines()].count(True) == 0
    assert len(re.findall(r"<details[^>]*\shidden", dom.stdout)) == 2
    assert "<script>alert" not in dom.stdout and "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout


def training_metrics() -> list[str]:
    """metrics.jsonl lines as train.py writes them: an evaluation after SFT, then 5 GRPO steps."""
    import math
    lines = [json.dumps({"step": 0, "eval": {"all": {"f1": 30.0, "em": 20.0, "n": 9}}})]
    for step in range(1, 6):
        lines.append(json.dumps({"step": step, "reward": 0.1 * step, "f1": 0.1 * step, "atr": 0.5, "alpha": 0.5,
                                 "tool_calls": 1.0, "format_ok": 1.0, "f1_group_std": 0.2, "atr_group_std": 0.1,
                                 "atr_f1_corr": math.nan, "atr_adv_share": 0.3, "groups_outcome_flat": 2,
                                 "groups_rescued": 1}))
    return lines


def report_py(*args) -> subprocess.CompletedProcess:
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, str(root / "report.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_plot_run_draws_the_curves_and_diagnostics_of_a_training_run(tmp_path):
    """`python report.py plot RUN` on a metrics.jsonl as train.py writes it, a torn last line included."""
    lines = training_metrics()
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "rew')
    proc = report_py("plot", tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name in ("curves.png", "diagnostics.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / name).stat().st_size > 20_000
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n")
    proc = report_py("plot", tmp_path)
    assert proc.returncode != 0 and "no GRPO step logged yet" in proc.stderr


def test_the_report_inlines_the_training_runs_curves(tmp_path):
    """`python report.py DIR --curves RUN`: RUN's two PNGs inside report.html as data: URIs (no file beside it, no
    external asset); a RUN without a metrics.jsonl is named and no report is written."""
    import base64
    from qa_data import write_jsonl
    evaluation, run = tmp_path / "eval", tmp_path / "run"
    evaluation.mkdir()
    run.mkdir()
    (evaluation / "metrics.json").write_text(json.dumps(metrics()))
    write_jsonl(records(), evaluation / "trajectories.jsonl")
    (run / "metrics.jsonl").write_text("\n".join(training_metrics()) + "\n")
    proc = report_py(evaluation, "--curves", run)
    assert proc.returncode == 0, proc.stderr
    page = (evaluation / "report.html").read_text()
    parsed = TextAndTags()
    parsed.feed(page)
    images = [a for t, a in parsed.tags if t == "img"]
    assert [a["alt"] for a in images] == ["curves", "diagnostics"]
    for a in images:
        png = (evaluation / f"{a['alt']}.png").read_bytes()       # drawn beside the report; RUN is only read
        assert base64.b64decode(a["src"].removeprefix("data:image/png;base64,")) == png
    assert page.index("Training curves") < page.index("<h2>Trajectories")
    assert all(a["src"].startswith("data:") for _, a in parsed.tags if "src" in a)          # one offline file
    (evaluation / "report.html").unlink()
    proc = report_py(evaluation, "--curves", tmp_path / "missing")
    assert proc.returncode != 0 and str(tmp_path / "missing" / "metrics.jsonl") in proc.stderr
    assert not (evaluation / "report.html").exists()
    proc = report_py(evaluation, "--plots", run)
    assert proc.returncode != 0 and proc.stderr.startswith("usage:")
