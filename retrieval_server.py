"""The retrieval server: BM25 over a jsonl corpus behind the `POST /retrieve` API that Search-R1-style servers
share, so one server can feed every rank and any Search-R1 client works (retrievers.HTTPRetriever is ours).

    python retrieval_server.py serve --corpus corpus.jsonl --port 8000
    curl -s localhost:8000/retrieve -d '{"queries": ["who wrote hamlet"], "topk": 3, "return_scores": true}'

The rule: no client - malformed, slow, greedy or gone - can crash the server, hold a worker past its deadline,
or make it hold more memory than the limits below allow. Every refusal is an HTTP error with a JSON body
{"error": "..."} naming the limit; nothing a client sends prints a traceback.

  - Workers: a fixed pool of `--workers` threads serves connections, one request per connection (HTTP/1.0, no
    keep-alive, so an idle client cannot sit on a worker between requests). While every worker is busy the accept
    loop waits, and new connections queue in the kernel's listen backlog (`--backlog`), not in new threads.
  - Deadlines: a client has `--request-timeout` seconds in all to send its request (request line, headers and
    body), and again as long to take the reply; a client that trickles bytes or stops reading is cut off then
    (net.Deadline shuts the socket down, which ends a blocked read or write at once) and its worker is free.
    The search itself is not counted against the client.
  - Sizes: the body is at most `--max-body-bytes`; a request asks for at most `--max-queries` queries, a topk of at
    most `--topk-max`, and queries x topk of at most `--max-passages` passages, which bounds one reply (~3 MB of
    wiki-18's 100-word passages at the default) and the memory of building it; the request line and each header
    line are at most 64 KiB, at most 100 headers (http.server's limits). So the memory in flight is at most
    `--workers` such replies, and `serve` caps glibc's malloc arenas at 2 so that what the workers free is reused
    rather than kept per thread (limit_malloc_arenas).
  - Parsing: the body is decoded by net.loads, so deep nesting, 5,000-digit integers and bad UTF-8 are a 400 like
    any other malformed body; wrong types are named in the error.
  - Methods: POST /retrieve, GET and HEAD /health; an unknown path gets 404, any other method (on any path) or a
    known method on the wrong path 405 with an `Allow` header. HEAD gets GET's headers and no body, for every
    reply (404 and 405 too).
  - Faults are counted, not printed: clients that hung up (`disconnects`), clients cut off by a deadline
    (`timeouts`), replies by class (`ok`, `rejected` = 4xx, `failed` = 5xx); GET /health shows the counts.

Our choices (the paper is silent): a request without "topk" gets 3 (Search-R1's default); 16 workers (searches run
one at a time per index anyway, so more workers only help with slow clients); a backlog of 1024 (the kernel caps
it at net.core.somaxconn); 30 s per request and again per reply; 512 queries, topk <= 100 and 5,120 passages per
request (512 queries at the paper's top-10: one rank's turn of 256 x 16 rollouts over 8 ranks), a 1 MiB body.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import NamedTuple

import net
from retrievers import BM25Retriever

MAX_LINE = 65536                                        # bytes of the request line (http.server's limit for headers)
ROUTES = {"/health": ("GET", "HEAD"), "/retrieve": ("POST",)}
METHODS = ("GET", "HEAD", "POST")


@dataclass(frozen=True)
class Limits:
    topk_max: int = 100
    max_queries: int = 512
    max_passages: int = 5120
    max_body_bytes: int = 1 << 20
    request_timeout: float = 30.0


def _short(value: object, n: int = 80) -> str:
    """repr of a client's value, cut to n characters, for an error message."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def parse_retrieve_request(body: bytes, limits: Limits) -> tuple[list[str], int, bool]:
    """Validate a `/retrieve` body -> (queries, topk, return_scores); anything wrong raises ValueError saying what."""
    try:
        request = net.loads(body)
    except ValueError as e:
        raise ValueError(f"the body is not valid JSON ({e})") from None
    if not isinstance(request, dict):
        raise ValueError("the body must be a JSON object")
    queries = request.get("queries")
    if not isinstance(queries, list) or not queries or not all(isinstance(q, str) for q in queries):
        raise ValueError("'queries' must be a non-empty list of strings")
    if len(queries) > limits.max_queries:
        raise ValueError(f"at most {limits.max_queries} queries per request, got {len(queries)}")
    topk = request.get("topk", 3)  # Search-R1's default
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= limits.topk_max:
        raise ValueError(f"'topk' must be an integer in [1, {limits.topk_max}], got {_short(topk)}")
    return_scores = request.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise ValueError(f"'return_scores' must be true or false, got {_short(return_scores)}")
    if len(queries) * topk > limits.max_passages:
        raise ValueError(f"{len(queries)} queries x topk {topk} = {len(queries) * topk} passages; at most "
                         f"{limits.max_passages} per request (max_passages): split the queries over several requests")
    return queries, topk, return_scores


class Reply(NamedTuple):
    code: int
    payload: dict
    allow: str | None = None      # the Allow header of a 405


def _encode(payload: dict) -> bytes:
    try:
        return json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:    # a lone surrogate (a corpus may hold "\ud800"): send it \u-escaped instead
        return json.dumps(payload).encode()


class RetrieveHandler(BaseHTTPRequestHandler):
    """One connection, one request: read it within a deadline, answer it, write the reply within a new deadline."""
    server: RetrievalServer
    default_request_version = "HTTP/1.0"   # a request line without a version gets a full reply (status + headers)
    disable_nagle_algorithm = True         # headers and body are two writes: do not wait for an ACK between them

    def handle(self) -> None:
        self.close_connection = True
        request = self._within_deadline(self._read_request)
        if request is None:                # the client hung up or ran out of time
            return
        reply = request if isinstance(request, Reply) else self._retrieve(*request)
        self._within_deadline(self._send, reply)

    def _within_deadline(self, step, *args):
        """Run one I/O step under the request timeout; None if the client hung up or was cut off (counted)."""
        with net.Deadline(self.server.limits.request_timeout) as deadline:
            deadline.watch(self.connection)
            try:
                result, fault = step(*args), None
            except OSError:                # reset, broken pipe, or I/O on the socket the deadline shut down
                result, fault = None, "disconnects"
        if deadline.expired:
            result, fault = None, "timeouts"
        if fault:
            self.server.count(fault)
        return result

    # ------------------------------------------------------------------ reading (the client's time)

    def _read_request(self) -> Reply | tuple[list[str], int, bool]:
        self.command, self.request_version, self.requestline = None, "HTTP/1.0", ""
        self.raw_requestline = self.rfile.readline(MAX_LINE + 1)
        if not self.raw_requestline:
            raise ConnectionAbortedError("the client closed the connection before sending a request")
        if len(self.raw_requestline) > MAX_LINE:
            return Reply(414, {"error": f"the request line is longer than {MAX_LINE} bytes"})
        self._parse_error = Reply(400, {"error": "empty request line"})
        if not self.parse_request():       # a malformed request line or header block: parse_request said why
            return self._parse_error
        method, path = self.command, self.path
        if method not in METHODS:
            return Reply(405, {"error": f"method {_short(method, 40)} not allowed; use POST /retrieve or GET /health"},
                         ", ".join(METHODS))
        allowed = ROUTES.get(path)
        if allowed is None:
            return Reply(404, {"error": f"unknown path {_short(path)}; use POST /retrieve or GET /health"})
        if method not in allowed:
            return Reply(405, {"error": f"use {' or '.join(allowed)} for {path}"}, ", ".join(allowed))
        if path == "/health":
            return Reply(200, self.server.health())
        return self._read_retrieve_body()

    def send_error(self, code, message=None, explain=None) -> None:
        """http.server's parse_request reports a malformed request line or header block here: keep it as the reply."""
        self._parse_error = Reply(code, {"error": (message or HTTPStatus(code).phrase)[:200]})

    def _read_retrieve_body(self) -> Reply | tuple[list[str], int, bool]:
        limits = self.server.limits
        if "Transfer-Encoding" in self.headers:
            return Reply(411, {"error": "send the body with a Content-Length (no Transfer-Encoding)"})
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            return Reply(411, {"error": "a Content-Length header is required"})
        if len(set(lengths)) > 1 or not re.fullmatch(r"[0-9]{1,15}", lengths[0].strip()):
            return Reply(400, {"error": f"Content-Length must be one decimal integer, got {_short(lengths, 60)}"})
        length = int(lengths[0])
        if length > limits.max_body_bytes:
            return Reply(413, {"error": f"the body is {length} bytes; at most {limits.max_body_bytes} "
                                        "(max_body_bytes)"})
        body = self.rfile.read(length)
        if len(body) < length:
            return Reply(400, {"error": f"the body ended after {len(body)} of its {length} bytes"})
        try:
            return parse_retrieve_request(body, limits)
        except ValueError as e:
            return Reply(400, {"error": str(e)})

    # ------------------------------------------------------------------ answering (the server's time)

    def _retrieve(self, queries: list[str], topk: int, return_scores: bool) -> Reply:
        try:
            results = self.server.retriever.search(queries, topk)
        except Exception as e:  # a search bug must not stop the server: answer 500 and keep serving
            return Reply(500, {"error": f"search failed: {type(e).__name__}: {e}"})
        docs = [[{"id": d.id, "contents": d.contents} for d in row] for row in results]
        if return_scores:
            docs = [[{"document": doc, "score": d.score} for doc, d in zip(row_docs, row)]
                    for row_docs, row in zip(docs, results)]
        return Reply(200, {"result": docs})

    # ------------------------------------------------------------------ writing (the client's time again)

    def _send(self, reply: Reply) -> None:
        body = _encode(reply.payload)
        self.send_response(reply.code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if reply.allow:
            self.send_header("Allow", reply.allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.server.count("ok" if reply.code < 400 else "rejected" if reply.code < 500 else "failed")

    def log_message(self, format, *args) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class RetrievalServer(HTTPServer):
    """An HTTP server whose connections are served by a fixed pool of worker threads.

    `serve_forever` accepts a connection only when a worker is free, so under load connections wait in the
    listen backlog (`backlog`) rather than each getting a thread. `shutdown` and `server_close` work as for any
    socketserver; `server_close` returns at once, and a worker still serving ends within its deadlines."""

    def __init__(self, address: tuple[str, int], retriever, limits: Limits = Limits(), *, workers: int = 16,
                 backlog: int = 1024, verbose: bool = False):
        if workers < 1 or backlog < 1 or limits.request_timeout <= 0:
            raise ValueError(f"workers, backlog and request_timeout must be positive, got {workers}, {backlog}, "
                             f"{limits.request_timeout}")
        self.request_queue_size = backlog         # read by server_activate's listen() in the constructor below
        super().__init__(address, RetrieveHandler)
        self.retriever, self.limits, self.workers, self.verbose = retriever, limits, workers, verbose
        self._free_workers = threading.BoundedSemaphore(workers)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="retrieval-worker")
        self._closing = threading.Event()
        self._counts, self._counts_lock = Counter(), threading.Lock()

    def process_request(self, request, client_address) -> None:
        """Called by the accept loop: wait for a free worker (new connections queue in the backlog meanwhile)."""
        while not self._free_workers.acquire(timeout=0.05):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        self._pool.submit(self._work, request, client_address)

    def _work(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._free_workers.release()

    def handle_error(self, request, client_address) -> None:
        """A client that hung up is counted, with no traceback; anything else is a bug and prints one."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            self.count("disconnects")
        else:
            super().handle_error(request, client_address)

    def count(self, what: str) -> None:
        with self._counts_lock:
            self._counts[what] += 1

    def counts(self) -> dict[str, int]:
        with self._counts_lock:
            return dict(self._counts)

    def health(self) -> dict:
        return {"status": "ok", "backend": self.retriever.name, "passages": len(self.retriever.docs),
                "workers": self.workers, "counts": self.counts()}

    def shutdown(self) -> None:
        self._closing.set()                       # an accept loop waiting for a worker gives up
        super().shutdown()

    def server_close(self) -> None:
        self._closing.set()
        super().server_close()
        self._pool.shutdown(wait=False)


def make_server(retriever, host: str, port: int, *, topk_max: int = 100, max_queries: int = 512,
                max_passages: int = 5120, max_body_bytes: int = 1 << 20, request_timeout: float = 30.0,
                workers: int = 16, backlog: int = 1024, verbose: bool = False) -> RetrievalServer:
    """A server answering POST /retrieve and GET /health over `retriever` (see the module docstring for the limits).
    Bad requests get a JSON {"error": ...} with HTTP 400 / 404 / 405 / 411 / 413 / 414 / 431; a failing search
    gets 500; no request can stop the server."""
    limits = Limits(topk_max=topk_max, max_queries=max_queries, max_passages=max_passages,
                    max_body_bytes=max_body_bytes, request_timeout=request_timeout)
    return RetrievalServer((host, port), retriever, limits, workers=workers, backlog=backlog, verbose=verbose)


def limit_malloc_arenas(n: int = 2) -> bool:
    """Cap glibc's malloc arenas (M_ARENA_MAX) for the threads created from now on; False where it does not apply.

    glibc gives threads that allocate at once their own arenas (up to 8 per core) and keeps what they free: after
    24-50 clients took the largest allowed replies at once the server kept ~165 MB over its idle RSS, with 2 arenas
    ~20 MB, at the same throughput (bench/bench_server.py). $MALLOC_ARENA_MAX, if set, wins; not glibc: no-op."""
    if "MALLOC_ARENA_MAX" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return ctypes.CDLL("libc.so.6").mallopt(-8, n) == 1     # -8: M_ARENA_MAX in malloc.h
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The retrieval server's command line (see the module docstring).")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve BM25 over a jsonl corpus under the POST /retrieve API")
    serve.add_argument("--corpus", required=True, help="FlashRAG jsonl corpus (id + contents, or title + text)")
    serve.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve other machines)")
    serve.add_argument("--topk-max", type=int, default=100, help="largest topk a request may ask for")
    serve.add_argument("--max-queries", type=int, default=512, help="most queries in one request")
    serve.add_argument("--max-passages", type=int, default=5120, help="most queries x topk in one request")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body")
    serve.add_argument("--request-timeout", type=float, default=30.0,
                       help="seconds a client has to send its request, and again to take the reply")
    serve.add_argument("--workers", type=int, default=16, help="worker threads (connections served at once)")
    serve.add_argument("--backlog", type=int, default=1024, help="listen backlog: connections waiting for a worker")
    serve.add_argument("--index-dir", default=None, help="BM25 index folder (default: beside the corpus)")
    serve.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    if args.command == "serve":
        limit_malloc_arenas()
        t0 = time.perf_counter()
        retriever = BM25Retriever(args.corpus, index_dir=args.index_dir)
        server = make_server(retriever, args.host, args.port, topk_max=args.topk_max, max_queries=args.max_queries,
                             max_passages=args.max_passages, max_body_bytes=args.max_body_bytes,
                             request_timeout=args.request_timeout, workers=args.workers, backlog=args.backlog,
                             verbose=args.verbose)
        print(f"{'built' if retriever.index_built else 'loaded'} BM25 index of {len(retriever.docs)} passages "
              f"({retriever.index_dir}) in {time.perf_counter() - t0:.1f}s; "
              f"serving http://{args.host}:{server.server_address[1]}/retrieve", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
