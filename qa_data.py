"""Where questions come from: FlashRAG jsonl files, the FlashRAG hub datasets, and the paper's training mix.

Evaluation (evaluate.py, METHOD.md §5) and training (`train.py --data`, METHOD.md §4) read questions through this
file, so both accept the same data and reject the same bad rows.

- A question is a FlashRAG row: {"id", "question", "golden_answers": [str, ...], "metadata": {...}}.
  `load_jsonl_questions(path) -> (rows, bad_rows)`: a bad row (invalid JSON, question missing or not a non-empty
  string, golden_answers missing, empty, blank or not a list of strings, id or metadata of the wrong type) becomes
  a message "path:line: what is wrong" and is skipped; `warn_bad_rows` prints them (up to a cap) and their count,
  so bad data is never dropped silently. A row without `id` gets "<file stem>_<line>" (our choice).
- Size limits (hostile input, our choice): a question, and each golden answer, of more than `max_question_chars`
  (default `MAX_QUESTION_CHARS` = 4000: the longest question of the developer fixture's seven benchmarks is 238
  characters, its longest golden answer 99, so 10x rounded up with headroom; 4000 characters stay far below
  max_context = 32768 tokens), more than `MAX_GOLDEN_ANSWERS` = 1000 golden answers, or a raw jsonl line of more
  than `line_limit(max_question_chars)` bytes (max(1 MiB, 32 bytes per allowed character); the fixture's longest
  line is 1.4 kB) is a bad row. An over-long line is never read whole: it is skipped in 64 kB chunks, so a
  10 MB question costs ~1 MiB of memory, not a tokenization of 10 MB. evaluate.py, train.py (via run_setup.py)
  and teacher_data.py take `--max-question-chars`. Text that is not valid Unicode (a lone surrogate such as
  "\\ud800", which JSON allows) is a bad row too: the tokenizer raises on it, and so does writing it back as UTF-8.
- Prompts that do not fit (our choice): the loaders take `check`, a per-row test run after `row_problem`;
  `prompt_check(tokenizer, system, max_context)` makes the one evaluate.py, train.py and teacher_data.py pass.
  A row whose prompt (search_env.prompt_ids: system, user turn, assistant header, forced <think>) has
  max_context tokens or more leaves no room to generate (the rollout would end it as `finish=length` before its
  first token): "path:line: prompt is 40,211 tokens, max_context is 32768 (--max-context)". Only rows that could
  be that long are tokenized: a token holds at least one byte of the rendered text (byte-level BPE,
  SentencePiece, WordPiece), so a row whose rendered prompt has fewer bytes than max_context, less a small
  slack, fits without tokenizing; at the paper's limits (4000 characters, 32768 tokens) no row is tokenized.
- `load_benchmark(name, data_dir)`: DATA_DIR/<name>.jsonl, else the hub dataset RUC-NLPIR/FlashRAG_datasets
  (its test split, or dev where there is none, as FlashRAG and Search-R1 evaluate), loaded lazily with `datasets`.
  Offline without --data-dir, the OSError says to pass --data-dir. Errors: OSError when data cannot be read
  (a missing file, the hub unreachable), ValueError for no usable rows or a bad mix spec.
- `sample_rows`: the paper's 512 questions per benchmark (all of Bamboogle's 125) are drawn without replacement by
  an RNG seeded with (benchmark name, seed), kept in file order, so a run is reproducible.
- `load_questions(spec_or_paths, limit=None, seed=0) -> rows`: training or held-out questions (train.py --eval-data,
  with `limit_per_benchmark`), each tagged with its benchmark; jsonl paths or a hub mix such as
  "hub:nq=1,triviaqa=1,hotpotqa=3,2wikimultihopqa=3" (the paper's 1:1:3:3, train splits, proportions kept exactly by
  largest-remainder rounding; without a limit, the largest total the sources allow). Write the result with
  `write_jsonl` (or `python evaluate.py --make-train-data SPEC --out DIR`) to rerun offline.
  DeepResearcher's contamination filter needs an engine and the answer metric: `evaluate.contamination_filter`.

Run `python qa_data.py FILE.jsonl ...` to check files: it prints each bad row and the counts.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

HUB_DATASET = "RUC-NLPIR/FlashRAG_datasets"
MAX_QUESTION_CHARS = 4000       # 10x+ the longest fixture question (238 chars); also bounds each golden answer
MAX_GOLDEN_ANSWERS = 1000       # the fixture's most is 53 (a TriviaQA alias list)
_CHUNK = 1 << 16


def line_limit(max_question_chars: int = MAX_QUESTION_CHARS) -> int:
    """Bytes a raw jsonl line may hold: room for a full-size question and answers even when \\u-escaped,
    plus metadata."""
    if isinstance(max_question_chars, bool) or not isinstance(max_question_chars, int) or max_question_chars < 1:
        raise ValueError(f"max_question_chars must be a positive integer, got {max_question_chars!r}")
    return max(1 << 20, 32 * max_question_chars)


def question_chars_arg(text: str) -> int:
    """argparse type of --max-question-chars: a positive integer."""
    import argparse
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _brief(value, width: int = 60) -> str:
    """A short repr for a message; never the repr of a whole huge or deeply nested value."""
    try:
        if isinstance(value, str):
            return repr(value[:width])[:width]
        if isinstance(value, (list, dict)) and len(value) > 8:
            return f"<{type(value).__name__} of {len(value)} items>"
        return repr(value)[:width]
    except (ValueError, RecursionError):
        return f"<{type(value).__name__}>"


def row_problem(row, max_question_chars: int = MAX_QUESTION_CHARS) -> str | None:
    """What makes a FlashRAG question row unusable, or None when it is fine."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return f"'question' must be a non-empty string, got {_brief(row.get('question'))}"
    if len(row["question"]) > max_question_chars:
        return (f"'question' has {len(row['question'])} characters, more than the limit of {max_question_chars} "
                "(--max-question-chars)")
    golds = row.get("golden_answers")
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
        return f"'golden_answers' must be a non-empty list of strings, got {_brief(golds)}"
    if len(golds) > MAX_GOLDEN_ANSWERS:
        return f"{len(golds)} golden answers, more than the limit of {MAX_GOLDEN_ANSWERS}"
    longest = max(len(g) for g in golds)
    if longest > max_question_chars:
        return (f"a golden answer has {longest} characters, more than the limit of {max_question_chars} "
                "(--max-question-chars)")
    if not any(g.strip() for g in golds):
        return "every golden answer is blank"
    if not isinstance(row.get("id", ""), (str, int)) or isinstance(row.get("id"), bool):
        return f"'id' must be a string or an integer, got {_brief(row.get('id'))}"
    if not isinstance(row.get("metadata", {}), dict):
        return "'metadata' must be a JSON object"
    return _unicode_problem(row)


def _unicode_problem(row: dict) -> str | None:
    """A lone surrogate anywhere in the row (JSON's "\\ud800" decodes to one): it cannot be tokenized or written
    back as UTF-8."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds text that is not valid Unicode ({e.reason} {_brief(e.object[e.start:e.end])})"
    except (TypeError, ValueError, RecursionError) as e:   # a hub row's non-JSON value, or nesting too deep
        return f"cannot be written back as JSON ({type(e).__name__})"
    return None


PROMPT_SLACK = 8   # tokens a tokenizer may add beyond one per byte (SentencePiece's "▁" prefix, one per call)


def prompt_check(tokenizer, system: str, max_context: int):
    """The loaders' `check` for prompts that leave no room to generate (the module docstring): row -> problem."""
    from atomic_thought import THINK_PREFIX
    from search_env import prompt_ids
    marker = "\x00question\x00"
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                              {"role": "user", "content": marker}],
                                             add_generation_prompt=True, tokenize=False)
    fixed = len(rendered.encode()) - len(marker) + len(THINK_PREFIX.encode()) + PROMPT_SLACK

    def check(row: dict) -> str | None:
        if fixed + len(row["question"].encode("utf-8", "surrogatepass")) < max_context:
            return None                                  # at most one token per byte: it fits
        n = len(prompt_ids(tokenizer, row["question"], system))
        if n >= max_context:
            return f"prompt is {n:,} tokens, max_context is {max_context} (--max-context): no room to generate"
        return None
    return check


def _lines(f, limit: int):
    """(line_no, raw line or None when it holds more than `limit` bytes) of a binary file; an over-long line
    is skipped in chunks, never held whole."""
    line_no = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        line_no += 1
        if len(raw) > limit and not (len(raw) == limit + 1 and raw.endswith(b"\n")):
            n = len(raw)
            while not raw.endswith(b"\n"):
                raw = f.readline(_CHUNK)
                if not raw:
                    break
                n += len(raw)
            yield line_no, None, n
        else:
            yield line_no, raw, len(raw)


def _problem(row, max_question_chars: int, check) -> str | None:
    """row_problem, then the caller's `check` (e.g. `prompt_check`) on a row that passed it."""
    return row_problem(row, max_question_chars) or (check(row) if check is not None else None)


def load_jsonl_questions(path: str | os.PathLike, max_question_chars: int = MAX_QUESTION_CHARS, check=None
                         ) -> tuple[list[dict], list[str]]:
    """(rows, bad_rows) of a FlashRAG jsonl file. Each bad row is a message "path:line: what is wrong";
    a row without `id` gets "<file stem>_<line>". Lines over `line_limit(max_question_chars)` bytes are bad
    rows and are never read whole; `check(row) -> problem or None` adds a test (the module docstring)."""
    rows, bad, limit = [], [], line_limit(max_question_chars)
    with open(path, "rb") as f:
        for line_no, raw, size in _lines(f, limit):
            if raw is None:
                bad.append(f"{path}:{line_no}: line of {size} bytes, more than the limit of {limit} "
                           "(--max-question-chars)")
                continue
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (ValueError, RecursionError) as e:   # JSONDecodeError, UnicodeDecodeError, a 5000-digit int
                bad.append(f"{path}:{line_no}: not valid JSON ({_brief(str(e), 200)})")
                continue
            problem = _problem(row, max_question_chars, check)
            if problem:
                bad.append(f"{path}:{line_no}: {problem}")
            else:
                rows.append({**row, "id": str(row.get("id", f"{Path(path).stem}_{line_no}"))})
    return rows, bad


def warn_bad_rows(bad: list[str], cap: int = 20) -> None:
    """One warning line per bad row (the first `cap`), then the count: bad data is never skipped silently."""
    for message in bad[:cap]:
        print(f"warning: skipped bad row {message}", file=sys.stderr)
    if bad:
        print(f"warning: {len(bad)} bad row(s) skipped" + (f" ({len(bad) - cap} not shown)" if len(bad) > cap
                                                            else ""), file=sys.stderr)


def hub_rows(name: str, split: str | None = None, max_question_chars: int = MAX_QUESTION_CHARS, check=None
             ) -> tuple[list[dict], list[str]]:
    """(rows, bad_rows) of one FlashRAG hub dataset; split None = test, or dev where there is no test split."""
    try:
        import datasets   # lazily: only hub users need it, and it needs the network (or its cache)
        if split is None:
            split = "test" if "test" in datasets.get_dataset_split_names(HUB_DATASET, name) else "dev"
        dataset = datasets.load_dataset(HUB_DATASET, name, split=split)
    except (ImportError, OSError, ValueError) as e:   # offline: ConnectionError, an OSError
        raise OSError(f"cannot load {name!r} from the hub dataset {HUB_DATASET} ({type(e).__name__}: {e}). "
                           f"Offline? Pass --data-dir DIR holding {name}.jsonl in FlashRAG format") from None
    rows, bad = [], []
    for i, row in enumerate(dataset):
        row = {**row, "metadata": row.get("metadata") or {}}   # Arrow gives None where a row has no metadata
        problem = _problem(row, max_question_chars, check)
        if problem:
            bad.append(f"{HUB_DATASET}/{name}/{split} row {i}: {problem}")
        else:
            rows.append({**row, "id": str(row.get("id", f"{name}_{i}"))})
    return rows, bad


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None,
                   max_question_chars: int = MAX_QUESTION_CHARS, check=None) -> tuple[list[dict], list[str]]:
    """(rows, bad_rows) of an evaluation benchmark: DATA_DIR/<name>.jsonl, else the hub's test (or dev) split."""
    if data_dir is None:
        return hub_rows(name, max_question_chars=max_question_chars, check=check)
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        have = sorted(p.stem for p in Path(data_dir).glob("*.jsonl"))
        raise FileNotFoundError(f"benchmark {name!r}: {path} does not exist ({data_dir} holds {have})")
    return load_jsonl_questions(path, max_question_chars, check)


def sample_rows(rows: list[dict], n: int | None, seed: int, salt: str) -> list[dict]:
    """`n` rows drawn without replacement by an RNG seeded with (salt, seed), in their original order."""
    if n is None or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(f"{salt}:{seed}").sample(range(len(rows)), n))   # str seeds are stable across runs
    return [rows[i] for i in keep]


def parse_mix(spec: str) -> dict[str, float]:
    """"nq=1,triviaqa=1,hotpotqa=3" -> {"nq": 1.0, ...}; every weight must be a positive number."""
    weights = {}
    for part in spec.split(","):
        name, _, weight = (text.strip() for text in part.partition("="))
        try:
            value = float(weight)
        except ValueError:
            value = float("nan")
        if not name or name in weights or not 0 < value < float("inf"):
            raise ValueError(f"bad mix entry {part!r} in {spec!r}: expected name=positive_weight, each name once, "
                             "e.g. nq=1,hotpotqa=3")
        weights[name] = value
    return weights


def mix_counts(available: dict[str, int], weights: dict[str, float], total: int | None) -> dict[str, int]:
    """Questions per source in proportion to the weights, n_i = total·w_i/Σw rounded by largest remainder;
    total None = the largest total the sources allow at these proportions."""
    wsum = sum(weights.values())
    most = int(min(available[name] * wsum / w for name, w in weights.items()))
    if total is None:
        total = most
    elif total > most:
        raise ValueError(f"the mix {weights} gives at most {most} questions from {available}; lower --limit")
    exact = {name: total * w / wsum for name, w in weights.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: exact[name] - counts[name], reverse=True)
    for name in by_remainder[:total - sum(counts.values())]:
        counts[name] += 1
    return counts


def load_questions(spec_or_paths: str | list[str], *, limit: int | None = None, seed: int = 0,
                   limit_per_benchmark: int | None = None,
                   max_question_chars: int = MAX_QUESTION_CHARS, check=None) -> list[dict]:
    """Training or held-out questions: "hub:nq=1,triviaqa=1,hotpotqa=3,2wikimultihopqa=3" (the hub's train splits in
    these proportions, shuffled) or jsonl paths (a list, or one comma-separated string). Each row is tagged with its
    `benchmark` (the hub name, or the file's stem unless the row names one). `limit` = total number of questions,
    `limit_per_benchmark` = at most this many of each benchmark, both drawn with `seed`. Bad rows are warned about
    and skipped; `max_question_chars` bounds questions and golden answers, `check` adds a per-row test such as
    `prompt_check` (see the module docstring)."""
    if isinstance(spec_or_paths, str) and spec_or_paths.startswith("hub:"):
        weights = parse_mix(spec_or_paths[len("hub:"):])
        loaded = {}
        for name in weights:
            loaded[name], bad = hub_rows(name, "train", max_question_chars, check)
            warn_bad_rows(bad)
        counts = mix_counts({name: len(rows) for name, rows in loaded.items()}, weights, limit)
        out = [{**row, "benchmark": name} for name, rows in loaded.items()
               for row in sample_rows(rows, counts[name], seed, name)]
        random.Random(seed).shuffle(out)
    else:
        paths = spec_or_paths.split(",") if isinstance(spec_or_paths, str) else list(spec_or_paths)
        out = []
        for path in paths:
            rows, bad = load_jsonl_questions(path, max_question_chars, check)
            warn_bad_rows(bad)
            out += [{**row, "benchmark": row.get("benchmark") or Path(path).stem} for row in rows]
        if not out:
            raise ValueError(f"no usable questions in {paths}")
        out = sample_rows(out, limit, seed, "train")
    if limit_per_benchmark is not None:
        names = list(dict.fromkeys(row["benchmark"] for row in out))
        keep = {id(row) for name in names
                for row in sample_rows([r for r in out if r["benchmark"] == name], limit_per_benchmark, seed, name)}
        out = [row for row in out if id(row) in keep]
    return out


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> None:
    """One JSON object per line, UTF-8 as it is (the FlashRAG format every reader here takes)."""
    with open(path, "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        good, bad_rows = load_jsonl_questions(arg)
        warn_bad_rows(bad_rows, cap=len(bad_rows))
        print(f"{arg}: {len(good)} usable rows, {len(bad_rows)} bad")
