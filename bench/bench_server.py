"""Load test of the retrieval server (retrieval_server.py), bounded and on loopback only.

The server runs as a subprocess over a synthetic corpus built in a temporary folder (~70-word passages of made-up
words drawn from a Zipf law, ~600 bytes each like wiki-18's, from a fixed seed), so its memory can be read from
/proc/<pid>/status. Two phases:

  1. throughput: `--clients` (50) threads send small requests (`--queries` known-item queries at topk `--topk`)
     on fresh connections for `--seconds`, or until `--max-requests`; reports requests/s, p50 / p99 / max latency
     and the errors by kind (connection resets, refusals, timeouts, HTTP codes);
  2. large replies: `--big-clients` (24) clients at once, each sending `--big-rounds` requests of each shape in
     `--big-shapes` (default 512x100, the issue's 12 KB request for a 23 MB reply, and 512x10, the largest the
     server allows by default); reports the reply sizes and the server's peak RSS (VmHWM, reset before each shape
     through /proc/<pid>/clear_refs) and its RSS `--settle` seconds after the last reply (retained).

    python bench/bench_server.py                                  # the full run (~2 minutes on 2 cores)
    python bench/bench_server.py --smoke --out r.json             # seconds: tests/test_bench.py runs it
    python bench/bench_server.py --server-script /tmp/old/retrievers.py --server-args ""   # another server

The client threads share one Python process (and the GIL) and the machine with the server: on a small machine
the numbers are a floor for the server, not its limit.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_corpus(path: Path, n_passages: int, words: int, seed: int) -> list[list[str]]:
    """Write a FlashRAG jsonl corpus of synthetic passages; return each passage's words (for known-item queries)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab = sorted({"".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(20_000)})
    weights = [1.0 / r for r in range(1, len(vocab) + 1)]  # Zipf: P(rank r) ~ 1/r
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)
    passages = []
    with path.open("w") as f:
        for n in range(n_passages):
            text = rng.choices(vocab, cum_weights=cum, k=words)
            passages.append(text)
            f.write(json.dumps({"id": str(n), "contents": f'"Passage {n}"\n{" ".join(text)}'}) + "\n")
    return passages


def request_body(rng: random.Random, passages: list[list[str]], n_queries: int, topk: int) -> bytes:
    queries = [" ".join(rng.sample(rng.choice(passages), 6)) for _ in range(n_queries)]
    return json.dumps({"queries": queries, "topk": topk, "return_scores": True}).encode()


class Server:
    """The server under test, as a subprocess on 127.0.0.1 (any free port)."""

    def __init__(self, script: Path, corpus: Path, extra_args: list[str], timeout: float = 300.0):
        cmd = [sys.executable, str(script), "serve", "--corpus", str(corpus), "--port", "0", *extra_args]
        self.log = open(corpus.parent / "server.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        line = self.proc.stdout.readline()          # "... serving http://127.0.0.1:PORT/retrieve"
        match = re.search(r"serving http://[^:]+:(\d+)/", line)
        if not match:
            self.stop()
            raise RuntimeError(f"the server did not start: {line!r}\n{self.log_text()[-2000:]}")
        self.port = int(match.group(1))

    def memory_mb(self) -> dict[str, float]:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        values = {k: int(v) / 1024 for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}
        return {"rss": values["VmRSS"], "peak": values["VmHWM"]}

    def reset_peak(self) -> bool:
        try:
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")   # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def log_text(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def one_request(port: int, body: bytes, timeout: float) -> tuple[float, str, int]:
    """POST /retrieve on a fresh connection -> (seconds, "ok" | "HTTP <code>" | exception name, reply bytes)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/retrieve", body, {"Content-Type": "application/json"})
        reply = conn.getresponse()
        data = reply.read()
        kind = "ok" if reply.status == 200 else f"HTTP {reply.status}"
    except Exception as e:                      # every failure is a result here, counted by kind
        kind, data = type(e).__name__, b""
    finally:
        conn.close()
    return time.perf_counter() - t0, kind, len(data)


def run_clients(port: int, bodies: list[bytes], clients: int, *, seconds: float | None, per_client: int | None,
                max_requests: int | None = None, timeout: float = 60.0) -> tuple[list[tuple[float, str, int]], float]:
    """`clients` threads sending bodies in turn until `seconds` pass, `per_client` requests each, or `max_requests`
    in all; -> every (seconds, kind, bytes) and the wall time."""
    results: list[tuple[float, str, int]] = []
    lock, start = threading.Lock(), threading.Barrier(clients + 1)
    budget = [max_requests if max_requests is not None else float("inf")]

    def client(i: int) -> None:
        start.wait()
        end = time.perf_counter() + seconds if seconds is not None else float("inf")
        n = 0
        while time.perf_counter() < end and (per_client is None or n < per_client):
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            result = one_request(port, bodies[(i + n * clients) % len(bodies)], timeout)
            n += 1
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return results, time.perf_counter() - t0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def throughput(server: Server, bodies: list[bytes], args) -> dict:
    one_request(server.port, bodies[0], 30)   # warm-up
    results, wall = run_clients(server.port, bodies, args.clients, seconds=args.seconds, per_client=None,
                                max_requests=args.max_requests)
    ok = sorted(s for s, kind, _ in results if kind == "ok")
    return {"clients": args.clients, "requests": len(results), "ok": len(ok), "wall_s": round(wall, 2),
            "requests_per_s": round(len(ok) / wall, 1), "p50_ms": round(1000 * percentile(ok, 0.50), 1),
            "p99_ms": round(1000 * percentile(ok, 0.99), 1), "max_ms": round(1000 * (ok[-1] if ok else 0), 1),
            "errors": dict(Counter(kind for _, kind, _ in results if kind != "ok"))}


def large_replies(server: Server, body: bytes, shape: str, args) -> dict:
    peak_reset = server.reset_peak()
    time.sleep(0.2)
    before = server.memory_mb()["rss"]
    results, wall = run_clients(server.port, [body], args.big_clients, seconds=None, per_client=args.big_rounds,
                                timeout=600)
    peak = server.memory_mb()["peak"]
    time.sleep(args.settle)
    retained = server.memory_mb()["rss"]
    sizes = [n for _, kind, n in results if kind == "ok"]
    return {"shape": shape, "request_bytes": len(body), "clients": args.big_clients, "requests": len(results),
            "outcomes": dict(Counter(kind for _, kind, _ in results)),
            "reply_mb": round(max(sizes) / 2**20, 1) if sizes else 0.0, "wall_s": round(wall, 1),
            "rss_before_mb": round(before), "peak_rss_mb": round(peak), "retained_rss_mb": round(retained),
            "peak_is_since_start": not peak_reset}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--passages", type=int, default=10_000, help="synthetic passages in the corpus")
    p.add_argument("--words", type=int, default=70, help="words per passage")
    p.add_argument("--clients", type=int, default=50, help="concurrent clients in the throughput phase")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the throughput phase")
    p.add_argument("--max-requests", type=int, default=None, help="stop the throughput phase after this many")
    p.add_argument("--queries", type=int, default=4, help="queries per request in the throughput phase")
    p.add_argument("--topk", type=int, default=10, help="topk in the throughput phase (the paper's top-10)")
    p.add_argument("--big-clients", type=int, default=24, help="concurrent clients in the large-reply phase")
    p.add_argument("--big-rounds", type=int, default=1, help="requests per client and shape in that phase")
    p.add_argument("--big-shapes", default="512x100,512x10", help="queries x topk of the large requests")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before reading the retained RSS")
    p.add_argument("--server-script", default=str(ROOT / "retrieval_server.py"), help="script with a `serve` command")
    p.add_argument("--server-args", default="", help="extra arguments of `serve` (one shell-quoted string)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds (the test)")
    p.add_argument("--out", help="write the report here as JSON")
    args = p.parse_args(argv)
    if args.smoke:
        args.passages, args.clients, args.seconds, args.max_requests = 300, 4, 1.0, 200
        args.big_clients, args.big_rounds, args.big_shapes, args.settle = 2, 1, "512x100,64x10", 0.2
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.big_shapes.split(",") if s]

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        passages = make_corpus(corpus, args.passages, args.words, args.seed)
        bodies = [request_body(rng, passages, args.queries, args.topk) for _ in range(200)]
        server = Server(Path(args.server_script), corpus, shlex.split(args.server_args))
        try:
            idle_mb = server.memory_mb()["rss"]
            report = {"server": f"{Path(args.server_script).name} {args.server_args}".strip(),
                      "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, load average "
                                 f"{os.getloadavg()[0]:.2f} at start",
                      "corpus": f"{args.passages} passages x {args.words} words", "idle_rss_mb": round(idle_mb),
                      "throughput": throughput(server, bodies, args),
                      "large": [large_replies(server, request_body(rng, passages, q, k), f"{q}x{k}", args)
                                for q, k in shapes]}
            try:
                report["server_counts"] = server.health().get("counts")
            except Exception as e:
                report["server_counts"] = f"no health ({type(e).__name__})"
        finally:
            server.stop()
        log = server.log_text()
        report["server_tracebacks"] = log.count("Traceback (most recent call last)")

    t = report["throughput"]
    print(f"# {report['server']}: {report['corpus']}; {report['machine']}; idle RSS {report['idle_rss_mb']} MB")
    print("| clients | requests | req/s | p50 ms | p99 ms | max ms | errors |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {t['clients']} | {t['requests']} | {t['requests_per_s']} | {t['p50_ms']} | {t['p99_ms']} | "
          f"{t['max_ms']} | {t['errors'] or 'none'} |")
    print("\n| large request | clients | outcomes | reply MB | RSS before MB | peak RSS MB | retained RSS MB | "
          "wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["large"]:
        print(f"| {r['shape']} ({r['request_bytes'] // 1024} KB) | {r['clients']} | {r['outcomes']} | {r['reply_mb']} "
              f"| {r['rss_before_mb']} | {r['peak_rss_mb']} | {r['retained_rss_mb']} | {r['wall_s']} |")
    print(f"\nserver counts: {report['server_counts']}; tracebacks in the server log: {report['server_tracebacks']}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
