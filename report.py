"""How a run is shown: the paper's Table 1 with our row, one HTML page of every trajectory, training curves.

evaluate.py computes; this file only presents what it wrote (metrics.json and the trajectory records):
- `markdown_table1`: F1 ×100 laid out as Table 1 of the paper (METHOD.md §5) - the seven benchmarks as columns,
  our row, then the paper's Atom-Searcher and DeepResearcher rows for reference (printed only when one of the
  seven was evaluated); any other benchmark gets its own column. `markdown_stats`: one row per benchmark with
  the test-time statistics the paper compares (tokens, think tokens, atoms per turn, tool calls) and counts.
- `render_report` / `write_report`: report.html, ONE self-contained file (inline CSS and JS, no external asset,
  works offline): the two tables, then every trajectory as a collapsible block - its atomic thoughts as tagged
  blocks coloured by the RRM's 0-10 score when there is one (red 0 -> green 10), each tool call, each tool
  response shaded as the masked part (mask 0: the environment's text, never trained on; the tool call itself
  is the policy's own, trained text), the turn the parser rejected when there is one, and the answer against
  the golden answers with F1, EM and the judge's verdict. Filters: benchmark, outcome (correct = EM 1,
  partial = 0 < F1, wrong = F1 0) and finish reason; they also read and write the URL's #fragment
  (`report.html#benchmark=nq&finish=length`), so a filtered view can be shared. With `curves` (evaluate.py
  --curves RUN, `python report.py DIR --curves RUN`) the PNGs of the training run that made the model, from
  `plot_run`, come after the tables, inline as data: URIs.

Safety: every string from the model, a web page, a judge or a data file is untrusted. All of it goes through
`html.escape` (text and attribute values); the only data inside a <script> is the metrics JSON, written by
`script_json`, which escapes `<`, `>` and `&` so no `</script>` or `<!--` in it can end the element. The JS reads
only data-* attributes and never builds HTML from strings. A hand-edited trajectories.jsonl is untrusted in its
shape too: every value is escaped whatever its JSON type (numbers print through `_num`, "?" for a non-number),
a record, turn, atom or tool call of the wrong type becomes a "malformed ..." placeholder naming file:line, and
`python report.py DIR` skips a line that is not JSON with a "file:line" warning; never a traceback. The inline
images are our own PNGs, base64-encoded: nothing of a data file reaches the page through them.

Size: the page holds the full tool responses (already cut to the tools' token budget), so a full 7 × 512-question
evaluation gives tens of MB; trajectories start collapsed. Regenerate with `python report.py DIR [--curves RUN]`.
"""
from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path

from atomic_thought import CANONICAL_TAGS

# Table 1 of the paper (F1 ×100, METHOD.md §5): column headers, and the rows printed beside ours.
COLUMNS = {"nq": "NQ", "triviaqa": "TQ", "hotpotqa": "HotpotQA", "2wikimultihopqa": "2Wiki", "musique": "MuSiQue",
           "bamboogle": "Bamboogle", "popqa": "PopQA"}
PAPER_ROWS = {
    "Atom-Searcher (paper)": {"nq": 44.0, "triviaqa": 81.8, "hotpotqa": 57.3, "2wikimultihopqa": 66.9,
                              "musique": 27.6, "bamboogle": 70.7, "popqa": 50.3},
    "DeepResearcher (paper)": {"nq": 39.6, "triviaqa": 78.4, "hotpotqa": 52.8, "2wikimultihopqa": 59.7,
                               "musique": 27.1, "bamboogle": 71.0, "popqa": 48.5},
}
# The left border of an atom block names its tag at a glance: one colour per canonical tag, grey for others.
TAG_COLORS = dict(zip(CANONICAL_TAGS, ("#2b6cb0", "#6b46c1", "#c05621", "#2f855a", "#b83280", "#2c7a7b")))


def _is_num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value, fmt: str = ".1f") -> str:
    """A number as text; "–" for None, "?" for anything that is not a number (a hand-edited file)."""
    if value is None:
        return "–"
    if not _is_num(value):
        return "?"
    try:
        return format(value, fmt)
    except (ValueError, OverflowError):
        return "?"


def _pct(value) -> str:
    return _num(100 * value if _is_num(value) else value)


def table1_rows(per_benchmark: dict[str, dict], label: str = "ours") -> tuple[list[str], list[list[str]]]:
    """(header, rows) of Table 1: F1 ×100 per benchmark, our row first."""
    paper = any(name in COLUMNS for name in per_benchmark)
    names = (list(COLUMNS) if paper else []) + [n for n in per_benchmark if n not in COLUMNS]
    ours = [_pct(per_benchmark[n].get("f1")) if per_benchmark.get(n, {}).get("n") else "–" for n in names]
    rows = [[label] + ours] + ([[method] + [_num(scores.get(n)) for n in names]
                                for method, scores in PAPER_ROWS.items()] if paper else [])
    return ["method"] + [COLUMNS.get(n, n) for n in names], rows


def stats_rows(per_benchmark: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per benchmark with the scores, test-time statistics and data counts."""
    header = ["benchmark", "n", "F1", "EM", "judge acc", "response tok", "think tok", "atoms/turn", "tool calls",
              "turns", "finish", "bad rows"]
    rows = []
    for name, m in per_benchmark.items():
        pct = lambda key: _pct(m.get(key))   # noqa: E731
        finish = m.get("finish", {})
        finish = (", ".join(f"{k} {v}" for k, v in sorted(finish.items())) if isinstance(finish, dict)
                  else str(finish))
        rows.append([name, str(m.get("n", 0)), pct("f1"), pct("em"), pct("judge_accuracy"),
                     _num(m.get("response_tokens")), _num(m.get("think_tokens")), _num(m.get("atoms_per_turn"), ".2f"),
                     _num(m.get("tool_calls"), ".2f"), _num(m.get("turns"), ".2f"), finish or "–",
                     str(m.get("bad_rows", 0))])
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header)] + rows
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def markdown_table1(per_benchmark: dict[str, dict], label: str = "ours") -> str:
    return _markdown(*table1_rows(per_benchmark, label))


def markdown_stats(per_benchmark: dict[str, dict]) -> str:
    return _markdown(*stats_rows(per_benchmark))


# ----------------------------------------------------------------------------- HTML
def esc(value) -> str:
    """Text or attribute value -> HTML (quotes escaped too, so it is safe inside attribute="...")."""
    return html.escape(str(value), quote=True)


def script_json(obj) -> str:
    """JSON that is safe inside <script>: `<`, `>` and `&` as \\u escapes, which JSON.parse reads back."""
    return (json.dumps(obj, ensure_ascii=False).replace("&", "\\u0026").replace("<", "\\u003c")
            .replace(">", "\\u003e").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def outcome(record: dict) -> str:
    f1 = record.get("f1", 0)
    return "correct" if record.get("em") == 1 else "partial" if _is_num(f1) and f1 > 0 else "wrong"


def _as_list(value) -> list:
    """A list field of a record; a hand-edited scalar or object becomes one (malformed) item, None none."""
    return value if isinstance(value, list) else [] if value is None else [value]


def _malformed(what: str, value) -> str:
    """The placeholder of a part of a record that has the wrong shape: its JSON text, escaped and cut short."""
    return f'<div class="bad">malformed {esc(what)}: {esc(_json_text(value)[:200])}</div>'


def _json_text(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def _atom_html(atom) -> str:
    if not isinstance(atom, dict):
        return _malformed("atom (expected an object)", atom)
    tag = atom.get("tag")
    score, color = atom.get("score"), TAG_COLORS.get(tag, "#718096") if isinstance(tag, str) else "#718096"
    style = f"border-left-color:{color}"
    if _is_num(score) and 0 <= score <= 10:
        style += f";background:hsl({12 * score:.0f},70%,86%)"   # hue 0 (red) at score 0 -> 120 (green) at 10
    reason = esc(atom.get("reason", ""))
    badge = f'<span class="score" title="{reason}">{esc(_num(score, "g"))}</span>' if score is not None else ""
    return (f'<div class="atom" style="{style}"><span class="tag" style="color:{color}">{esc(tag)}</span>'
            f'{badge}<div class="text">{esc(atom.get("text"))}</div></div>')


def _turn_html(k: int, turn) -> str:
    if not isinstance(turn, dict):
        return _malformed(f"turn {k} (expected an object)", turn)
    parts = [f'<div class="turn"><div class="turn-h">turn {k}</div>']
    if turn.get("atoms"):
        parts += [_atom_html(a) for a in _as_list(turn["atoms"])]
    elif turn.get("think"):
        parts.append(f'<div class="think">{esc(turn["think"])}</div>')   # a think block without atoms
    call = turn.get("tool_call")
    if call and not isinstance(call, dict):
        parts.append(_malformed("tool call (expected an object)", call))
    elif call:
        args = _json_text(call.get("arguments"))
        parts.append(f'<div class="call"><b>tool call</b> {esc(call.get("name"))} <code>{esc(args)}</code></div>')
        parts.append('<div class="masked"><div class="lbl">tool response (masked: not trained)</div>'
                     f'<pre>{esc(turn.get("tool_response") or "")}</pre></div>')
    if turn.get("answer") is not None:
        parts.append(f'<div class="call"><b>answer</b> {esc(turn["answer"])}</div>')
    return "".join(parts) + "</div>"


def _trajectory_html(r: dict) -> str:
    """One record as a <details> block. Every value from the record goes through `esc` (numbers through `_num`,
    which prints "?" for a non-number), whatever its JSON type."""
    verdict = f' · judge: {esc(r["judge"])}' if r.get("judge") else ""
    atr = f' · ATR {esc(_num(r["atr"], ".2f"))}' if _is_num(r.get("atr")) else ""
    turns = "".join(_turn_html(k, t) for k, t in enumerate(_as_list(r.get("turns")), start=1))
    if r.get("unparsed_turn") is not None:
        why, text = esc(r.get("format_error") or r.get("finish")), esc(r["unparsed_turn"])
        turns += f'<div class="turn bad"><div class="turn-h">rejected turn: {why}</div><pre>{text}</pre></div>'
    golden = " | ".join(str(g) for g in _as_list(r.get("golden_answers")))
    answer = "(no answer)" if r.get("answer") is None else r["answer"]
    f1, em = esc(_num(r.get("f1", 0), ".2f")), esc(_num(r.get("em", 0), ".0f"))
    counts = [esc(_num(r.get(key, 0), "g")) for key in ("tool_calls", "response_tokens", "think_tokens")]
    return (f'<details class="traj {outcome(r)}" data-benchmark="{esc(r.get("benchmark"))}" '
            f'data-outcome="{outcome(r)}" data-finish="{esc(r.get("finish"))}">'
            f'<summary><span class="badge">{esc(r.get("benchmark"))}</span> {esc(r.get("question"))} '
            f'<span class="res">F1 {f1} · {esc(r.get("finish"))}</span></summary>'
            f'{turns}<div class="final"><b>answer</b> {esc(answer)} <b>golden</b> {esc(golden)} '
            f'· F1 {f1} · EM {em}{verdict}{atr} · {counts[0]} '
            f'tool calls · {counts[1]} response tokens ({counts[2]} think)'
            '</div></details>')


def _record_html(i: int, r, where: str) -> str:
    """A record, or a placeholder naming where it is when it is not an object or cannot be shown."""
    if not isinstance(r, dict):
        return _malformed(f"record at {where} (expected a JSON object)", r)
    try:
        return _trajectory_html(r)
    except Exception as e:   # noqa: BLE001 - a shape this file did not foresee: a placeholder, never a traceback
        return f'<div class="bad">record at {esc(where)} cannot be shown ({esc(type(e).__name__)})</div>'


def _tables_html(per_benchmark) -> str:
    try:
        return (f"<h2>Table 1 (F1 ×100)</h2>{_html_table(*table1_rows(per_benchmark))}"
                f"<h2>Per benchmark</h2>{_html_table(*stats_rows(per_benchmark))}")
    except Exception as e:   # noqa: BLE001 - a hand-edited metrics.json
        return f'<p class="bad">metrics.json "benchmarks" cannot be shown ({esc(type(e).__name__)})</p>'



def _select(name: str, values: list[str]) -> str:
    options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
    return f'<label>{name} <select id="f-{name}"><option value="">all</option>{options}</select></label>'


CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1a202c;background:#fff}
table{border-collapse:collapse;margin:8px 0 20px}th,td{border:1px solid #cbd5e0;padding:3px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#edf2f7}td{white-space:nowrap}
#filters{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #cbd5e0}
#filters label{margin-right:14px}.traj{border:1px solid #cbd5e0;border-radius:6px;margin:6px 0;padding:4px 10px}
.traj.correct{border-left:5px solid #38a169}.traj.partial{border-left:5px solid #d69e2e}
.traj.wrong{border-left:5px solid #e53e3e}summary{cursor:pointer}.res{color:#4a5568;float:right}
.badge{background:#2d3748;color:#fff;border-radius:4px;padding:0 6px;font-size:12px}
.turn{margin:8px 0 8px 12px}.turn-h{font-weight:600;color:#4a5568}
.atom{border-left:4px solid;background:#f7fafc;margin:3px 0;padding:3px 8px;border-radius:3px}
.tag{font:600 11px monospace;margin-right:8px}.score{font:600 11px monospace;background:#fff;border-radius:8px;
padding:0 6px}.text,.think{white-space:pre-wrap}.call{margin:4px 0;font-family:monospace}
.masked{background:repeating-linear-gradient(45deg,#edf2f7,#edf2f7 8px,#e2e8f0 8px,#e2e8f0 16px);color:#4a5568;
padding:4px 8px;border-radius:3px}.lbl{font-size:11px;font-weight:600}
pre{white-space:pre-wrap;margin:2px 0;font-size:12px}.bad{background:#fff5f5;padding:4px 8px}
.final{margin:8px 0;padding:4px 8px;background:#f0fff4}.curves img{max-width:100%;display:block;margin:6px 0}"""

JS = """(function () {
  var keys = ['benchmark', 'outcome', 'finish'], sel = {};
  keys.forEach(function (k) { sel[k] = document.getElementById('f-' + k); });
  var items = document.querySelectorAll('.traj'), count = document.getElementById('count');
  function apply() {
    var shown = 0;
    items.forEach(function (el) {
      var ok = keys.every(function (k) { return !sel[k].value || el.dataset[k] === sel[k].value; });
      el.hidden = !ok;
      if (ok) shown++;
    });
    count.textContent = 'showing ' + shown + ' of ' + items.length;
    var parts = keys.filter(function (k) { return sel[k].value; })
      .map(function (k) { return k + '=' + encodeURIComponent(sel[k].value); });
    history.replaceState(null, '', '#' + parts.join('&'));
  }
  location.hash.slice(1).split('&').forEach(function (kv) {
    var i = kv.indexOf('='), k = kv.slice(0, i);
    if (i > 0 && sel[k]) sel[k].value = decodeURIComponent(kv.slice(i + 1));
  });
  keys.forEach(function (k) { sel[k].addEventListener('change', apply); });
  apply();
})();"""


def _curves_html(pngs: list[Path]) -> str:
    """A training run's plots (plot_run's PNGs), inline: the page stays one file that works offline."""
    images = "".join(f'<img alt="{esc(p.stem)}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"'
                     ">" for p in pngs)
    return f'<h2>Training curves</h2><div class="curves">{images}</div>' if pngs else ""


def render_report(metrics: dict, records: list[dict], where: list[str] | None = None,
                  curves: list[Path] | None = None) -> str:
    """The whole report.html as a string (metrics.json's dict and the trajectory records in; `curves`: PNG files to
    inline). `where[i]` names record i in placeholders (`python report.py` passes "file:line"; default "record
    i+1")."""
    where = where or [f"record {i + 1}" for i in range(len(records))]
    metrics = metrics if isinstance(metrics, dict) else {}
    per_benchmark = metrics.get("benchmarks", {})
    config = metrics.get("config", {})
    config = config if isinstance(config, dict) else {}
    meta = " · ".join(f"{k}: {config[k] if isinstance(config[k], str) else _json_text(config[k])[:200]}"
                      for k in ("model", "retriever", "seed", "max_turns", "max_new_tokens") if k in config)
    try:
        data = script_json(metrics)
    except (TypeError, ValueError, RecursionError):
        data = "null"   # the JS does not read it; the page stays valid
    good = [r for r in records if isinstance(r, dict)]
    filters = (_select("benchmark", list(dict.fromkeys(str(r.get("benchmark")) for r in good)))
               + _select("outcome", ["correct", "partial", "wrong"])
               + _select("finish", sorted({str(r.get("finish")) for r in good})) + '<span id="count"></span>')
    legend = ('<p>Atomic thoughts are coloured by the RRM score when judged (<span style="background:'
              'hsl(0,70%,86%)">0</span> → <span style="background:hsl(120,70%,86%)">10</span>); the hatched '
              'blocks are tool responses, the masked part of a trajectory.</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Atom-Searcher evaluation</title>"
            f"<style>{CSS}</style></head><body><h1>Evaluation report</h1><p>{esc(meta)}</p>"
            f"{_tables_html(per_benchmark)}{_curves_html(curves or [])}"
            f"<h2>Trajectories</h2>{legend}<div id=\"filters\">{filters}</div><div id=\"trajs\">"
            + "".join(_record_html(i, r, w) for i, (r, w) in enumerate(zip(records, where, strict=True)))
            + f'</div><script type="application/json" id="metrics">{data}</script>'
            f"<script>{JS}</script></body></html>\n")


def write_report(path: str | Path, metrics: dict, records: list[dict], where: list[str] | None = None,
                 curves: list[Path] | None = None) -> None:
    Path(path).write_text(render_report(metrics, records, where, curves), encoding="utf-8")


def read_run(run: str | Path) -> tuple[dict, list, list[str]]:
    """(metrics, records, where) of an evaluation folder. A line of trajectories.jsonl that is not JSON is
    reported on stderr as "file:line: ..." and skipped; an unreadable metrics.json is a SystemExit naming it."""
    run = Path(run)
    try:
        metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise SystemExit(f"{run / 'metrics.json'}: cannot read it ({type(e).__name__}: {str(e)[:200]})") from None
    records, where, path = [], [], run / "trajectories.jsonl"
    try:
        with open(path, "rb") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except (ValueError, RecursionError) as e:   # bad JSON, bad UTF-8, a 5000-digit number
                    print(f"warning: {path}:{line_no}: not valid JSON, skipped ({str(e)[:200]})", file=sys.stderr)
                    continue
                where.append(f"{path.name}:{line_no}")
    except OSError as e:
        raise SystemExit(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    return metrics, records, where


# ----------------------------------------------------------------------------- a training run's curves
CURVES = (("reward", "reward (R)"), ("f1", "rollout F1"), ("atr", "ATR"), ("alpha", "α (ATR weight)"),
          ("tool_calls", "tool calls per episode"), ("format_ok", "well-formed share"))
DIAGNOSTICS = (("f1_group_std", "within-group std of F1"), ("atr_group_std", "within-group std of ATR"),
               ("atr_f1_corr", "ATR-F1 correlation"), ("atr_adv_share", "ATR's share of reward variance"),
               ("groups_outcome_flat", "outcome-flat groups"), ("groups_rescued", "groups rescued by the ATR"))


def run_records(run: str | Path) -> tuple[list[dict], list[dict]]:
    """(per-step records, held-out evaluation records) of a train.py --out folder's metrics.jsonl; a torn or
    unreadable line is skipped (run_log.logged_record)."""
    from run_log import logged_record
    path = Path(run) / "metrics.jsonl"
    try:
        lines = path.read_text(errors="replace").splitlines(keepends=True)
    except OSError as e:
        raise SystemExit(f"{path}: cannot read it ({type(e).__name__}: {e})") from None
    records = [r for r in map(logged_record, lines) if r is not None]
    return [r for r in records if "eval" not in r], [r for r in records if "eval" in r]


def plot_panels(path: Path, panels, series: dict[str, dict[str, tuple[list[int], list[float], list[float] | None]]],
                title: str) -> Path:
    """One PNG of small panels, one per (key, label) of `panels`; `series[key][line name]` is (steps, means, band or
    None), the band drawn as mean ± it (over seeds, in bench/ablation.py). The first panel's lines get one legend
    under the figure; a panel with more lines than the first (the held-out F1 of plot_run) gets its own."""
    import matplotlib
    matplotlib.use("Agg")                          # files only, no display
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        lines = series.get(key, {})
        for name, (steps, mean, band) in lines.items():
            style = dict(marker="o", linestyle="--") if name.startswith("held-out") else {}
            line, = ax.plot(steps, mean, label=name, linewidth=1.5, **style)
            if band is not None:
                ax.fill_between(steps, [m - b for m, b in zip(mean, band)], [m + b for m, b in zip(mean, band)],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        if all(math.isnan(v) for _, mean, _ in lines.values() for v in mean):
            ax.text(0.5, 0.5, "no value in this run (not logged, or nothing judged)", ha="center", va="center",
                    transform=ax.transAxes)
        if len(lines) > len(series.get(panels[0][0], {})):
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("GRPO step", fontsize=8)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05 if len(labels) > 1 else 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run: str | Path, into: str | Path | None = None) -> list[Path]:
    """`python report.py plot RUN`: curves.png (reward, F1, ATR, α, tool calls, format per step, with the held-out
    F1 of each evaluation on the F1 panel) and diagnostics.png (curriculum.reward_diagnostics), written to `into`
    (default RUN itself; --curves passes the evaluation's folder, so a shared training folder is only read)."""
    run = Path(run)
    into = Path(run if into is None else into)
    steps, evals = run_records(run)
    if not steps:
        raise SystemExit(f"{run / 'metrics.jsonl'}: no GRPO step logged yet")
    x = [r["step"] for r in steps]

    def series(keys):
        return {key: {"this run": (x, [float(r.get(key, float("nan"))) for r in steps], None)} for key, _ in keys}
    curves = series(CURVES)
    if evals:
        curves["f1"]["held-out F1"] = ([r["step"] for r in evals], [r["eval"]["all"]["f1"] / 100 for r in evals], None)
    return [plot_panels(into / "curves.png", CURVES, curves, f"{run}: training curves"),
            plot_panels(into / "diagnostics.png", DIAGNOSTICS, series(DIAGNOSTICS), f"{run}: reward diagnostics")]


USAGE = """usage: python report.py DIR [--curves RUN]   DIR/report.html from evaluate.py's metrics.json and
                                           trajectories.jsonl in DIR; with the training curves of RUN
                                           (a train.py --out folder) when given
       python report.py plot RUN              RUN/curves.png and RUN/diagnostics.png"""


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plot":
        print("wrote " + ", ".join(map(str, plot_run(sys.argv[2]))))
        sys.exit()
    if len(sys.argv) not in (2, 4) or len(sys.argv) == 4 and sys.argv[2] != "--curves":
        sys.exit(USAGE)
    run_dir = Path(sys.argv[1])
    report = read_run(run_dir)                     # first: a bad DIR fails before anything is drawn
    write_report(run_dir / "report.html", *report,
                 curves=plot_run(sys.argv[3], into=run_dir) if len(sys.argv) == 4 else None)
    print(f"wrote {run_dir / 'report.html'}")
