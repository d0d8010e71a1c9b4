"""BM25 retrieval speed of retrievers.BM25Retriever (METHOD.md §9 target: >= 300 queries/s on 100k passages, one
thread).

A synthetic corpus stands in for Wikipedia: ~100-word passages whose words follow a Zipf law (rank^-1, like
natural text) over a fixed vocabulary of made-up words, generated from a fixed seed. Queries are 6 words drawn from
a random passage (a "known item" query), so the top-1 hit rate doubles as a sanity check that ranking works.
Measured on one pinned CPU thread: index build (tokenize + index + save), index load, and queries/s through
`BM25Retriever.search` (tokenization and Doc objects included) in rollout-sized batches and one query at a time.

    python bench/bench_bm25.py                      # 100k passages, prints a markdown row
    python bench/bench_bm25.py --passages 10000     # quicker
"""
import os

# one thread for every numeric library, set before numpy is imported
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from retrievers import BM25Retriever  # noqa: E402


def make_vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """`size` distinct made-up words of 2-4 syllables."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"] + ["qua", "sho", "thi", "cre", "blo"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables, size=rng.integers(2, 5))))
    return sorted(words)


def write_corpus(path: Path, n_passages: int, words_per_passage: int, vocab: list[str],
                 rng: np.random.Generator) -> np.ndarray:
    """Write a FlashRAG jsonl corpus; return the word ids of every passage, (N, words_per_passage)."""
    p = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf: P(rank r) ~ 1/r
    word_ids = rng.choice(len(vocab), size=(n_passages, words_per_passage), p=p / p.sum())  # (N, W)
    with path.open("w") as f:
        for n, row in enumerate(word_ids):
            text = " ".join(vocab[j] for j in row)
            f.write(json.dumps({"id": str(n), "contents": f'"Passage {n}"\n{text}'}) + "\n")
    return word_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--passages", type=int, default=100_000, help="number of synthetic passages")
    parser.add_argument("--words", type=int, default=100, help="words per passage")
    parser.add_argument("--vocab", type=int, default=50_000, help="vocabulary size")
    parser.add_argument("--queries", type=int, default=2_000, help="queries to time")
    parser.add_argument("--batch", type=int, default=64, help="queries per search call (a rollout batch)")
    parser.add_argument("--k", type=int, default=10, help="results per query (the paper's top-10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of corpus and queries")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core, so "one thread" is literal

    rng = np.random.default_rng(args.seed)
    vocab = make_vocabulary(rng, args.vocab)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        word_ids = write_corpus(corpus, args.passages, args.words, vocab, rng)
        t0 = time.perf_counter()
        retriever = BM25Retriever(corpus)
        build_s = time.perf_counter() - t0
        assert retriever.index_built
        t0 = time.perf_counter()
        assert not BM25Retriever(corpus).index_built
        load_s = time.perf_counter() - t0

        targets = rng.integers(0, args.passages, size=args.queries)  # (Q,)
        queries = [" ".join(vocab[j] for j in rng.choice(word_ids[t], size=6, replace=False)) for t in targets]
        retriever.search(queries[:8], args.k)  # warm-up
        t0 = time.perf_counter()
        results = []
        for start in range(0, len(queries), args.batch):
            results += retriever.search(queries[start:start + args.batch], args.k)
        batch_qps = len(queries) / (time.perf_counter() - t0)
        n_single = min(500, len(queries))
        t0 = time.perf_counter()
        for q in queries[:n_single]:
            retriever.search([q], args.k)
        single_qps = n_single / (time.perf_counter() - t0)
        top1 = np.mean([bool(r) and r[0].id == str(t) for r, t in zip(results, targets)])

    print(f"# BM25Retriever, {args.passages} synthetic passages x {args.words} words, vocab {args.vocab}, "
          f"k={args.k}, {platform.processor() or platform.machine()}, 1 thread")
    print("| passages | index build (s) | index load (s) | queries/s (batch %d) | queries/s (1 per call) | "
          "known-item top-1 |" % args.batch)
    print("|---|---|---|---|---|---|")
    print(f"| {args.passages} | {build_s:.1f} | {load_s:.2f} | {batch_qps:.0f} | {single_qps:.0f} | {top1:.2f} |")


if __name__ == "__main__":
    main()
