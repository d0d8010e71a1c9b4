"""Where questions come from: FlashRAG jsonl files, the FlashRAG hub datasets, and the paper's training mix.

Evaluation (evaluate.py, PAPER.md §5) and training (`train.py --data`, PAPER.md §4) read questions through this
file, so both accept the same data and reject the same bad rows.

- A question is a FlashRAG row: {"id", "question", "golden_answers": [str, ...], "metadata": {...}}.
  `load_jsonl_questions(path) -> (rows, bad_rows)`: a bad row (invalid JSON, question missing or not a non-empty
  string, golden_answers missing, empty, blank or not a list of strings, id or metadata of the wrong type) becomes
  a message "path:line: what is wrong" and is skipped; `warn_bad_rows` prints them (up to a cap) and their count,
  so bad data is never dropped silently. A row without `id` gets "<file stem>_<line>" (our choice).
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
  `toy_world.write_jsonl` (or `python evaluate.py --make-train-data SPEC --out DIR`) to rerun offline.
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


def row_problem(row) -> str | None:
    """What makes a FlashRAG question row unusable, or None when it is fine."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        return f"'question' must be a non-empty string, got {row.get('question')!r:.60}"
    golds = row.get("golden_answers")
    if not isinstance(golds, list) or not golds or not all(isinstance(g, str) for g in golds):
        return f"'golden_answers' must be a non-empty list of strings, got {golds!r:.60}"
    if not any(g.strip() for g in golds):
        return "every golden answer is blank"
    if not isinstance(row.get("id", ""), (str, int)) or isinstance(row.get("id"), bool):
        return f"'id' must be a string or an integer, got {row.get('id')!r:.60}"
    if not isinstance(row.get("metadata", {}), dict):
        return "'metadata' must be a JSON object"
    return None


def load_jsonl_questions(path: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """(rows, bad_rows) of a FlashRAG jsonl file. Each bad row is a message "path:line: what is wrong";
    a row without `id` gets "<file stem>_<line>"."""
    rows, bad = [], []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:   # json.JSONDecodeError and UnicodeDecodeError are both ValueErrors
                bad.append(f"{path}:{line_no}: not valid JSON ({e})")
                continue
            problem = row_problem(row)
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


def hub_rows(name: str, split: str | None = None) -> tuple[list[dict], list[str]]:
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
        problem = row_problem(row)
        if problem:
            bad.append(f"{HUB_DATASET}/{name}/{split} row {i}: {problem}")
        else:
            rows.append({**row, "id": str(row.get("id", f"{name}_{i}"))})
    return rows, bad


def load_benchmark(name: str, data_dir: str | os.PathLike | None = None) -> tuple[list[dict], list[str]]:
    """(rows, bad_rows) of an evaluation benchmark: DATA_DIR/<name>.jsonl, else the hub's test (or dev) split."""
    if data_dir is None:
        return hub_rows(name)
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        have = sorted(p.stem for p in Path(data_dir).glob("*.jsonl"))
        raise FileNotFoundError(f"benchmark {name!r}: {path} does not exist ({data_dir} holds {have})")
    return load_jsonl_questions(path)


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
                   limit_per_benchmark: int | None = None) -> list[dict]:
    """Training or held-out questions: "hub:nq=1,triviaqa=1,hotpotqa=3,2wikimultihopqa=3" (the hub's train splits in
    these proportions, shuffled) or jsonl paths (a list, or one comma-separated string). Each row is tagged with its
    `benchmark` (the hub name, or the file's stem unless the row names one). `limit` = total number of questions,
    `limit_per_benchmark` = at most this many of each benchmark, both drawn with `seed`. Bad rows are warned about
    and skipped."""
    if isinstance(spec_or_paths, str) and spec_or_paths.startswith("hub:"):
        weights = parse_mix(spec_or_paths[len("hub:"):])
        loaded = {}
        for name in weights:
            loaded[name], bad = hub_rows(name, "train")
            warn_bad_rows(bad)
        counts = mix_counts({name: len(rows) for name, rows in loaded.items()}, weights, limit)
        out = [{**row, "benchmark": name} for name, rows in loaded.items()
               for row in sample_rows(rows, counts[name], seed, name)]
        random.Random(seed).shuffle(out)
    else:
        paths = spec_or_paths.split(",") if isinstance(spec_or_paths, str) else list(spec_or_paths)
        out = []
        for path in paths:
            rows, bad = load_jsonl_questions(path)
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


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        good, bad_rows = load_jsonl_questions(arg)
        warn_bad_rows(bad_rows, cap=len(bad_rows))
        print(f"{arg}: {len(good)} usable rows, {len(bad_rows)} bad")
