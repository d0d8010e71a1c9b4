"""Tests of the retrieval server (retrieval_server.py) against hostile and faulty clients, by class of attack:
malformed bodies, every HTTP method, oversized or malformed requests, slow clients (request line, headers, body,
a reply nobody reads), clients that vanish mid-reply, more connections than workers, shutdown under load.

Each runs a real server on a thread on 127.0.0.1 and talks to it over raw sockets, so what is asserted is what
goes over the wire. Deadlines are 1 s here; a cut-off is asserted to happen within the deadline plus slack.
"""
import json
import select
import socket
import struct
import threading
import time
import urllib.error
import urllib.request

import pytest

from retrieval_server import make_server
from retrievers import BM25Retriever, HTTPRetriever
from test_search_env import PASSAGES

GOOD = b'{"queries": ["Everest"], "topk": 1}'
BIG = json.dumps({"queries": ["common"] * 16, "topk": 1}).encode()   # 16 copies of a 1 MB passage: a 17 MB reply


def write_corpus(folder, passages):
    folder.mkdir()
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in passages) + "\n")
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return BM25Retriever(write_corpus(tmp_path_factory.mktemp("small") / "c", PASSAGES))


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A passage of ~1 MB: a few queries make a reply larger than every socket buffer on the way."""
    passages = [{"id": "big", "contents": '"Big"\n' + "common " * 150_000}, PASSAGES[1]]
    return BM25Retriever(write_corpus(tmp_path_factory.mktemp("big") / "c", passages))


@pytest.fixture
def serve():
    """start(retriever, **make_server options) -> (server, port), served on a thread; all shut down afterwards."""
    servers = []

    def start(retriever, **options):
        server = make_server(retriever, "127.0.0.1", 0, **options)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return server, server.server_address[1]

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def http(method, path, body=b"", headers=None):
    """The bytes of a request; a Content-Length is added for a body unless `headers` has one."""
    headers = dict(headers or {})
    if body and not any(k.lower() == "content-length" for k in headers):
        headers["Content-Length"] = str(len(body))
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_reply(sock):
    """Read to EOF -> (status, headers with lower-case names, body); status 0 if nothing came back."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:   # the server closed with part of our request unread: its reply came first
            break
        if not chunk:
            break
        chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if not head:
        return 0, {}, b""
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def exchange(port, data, *, half_close=False, timeout=10):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_reply(sock)


def post(port, body):
    status, _, reply = exchange(port, http("POST", "/retrieve", body))
    return status, json.loads(reply)


def wait_for(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)
    return condition()


# ----------------------------------------------------------------------------- what a good client gets

def test_server_answers_a_plain_client_and_our_client(serve, small):
    _, port = serve(small, topk_max=10, max_queries=4)
    code, reply = post(port, json.dumps({"queries": ["Eiffel tower", "Great Wall of China"], "topk": 2,
                                         "return_scores": True}).encode())
    assert code == 200 and len(reply["result"]) == 2
    top = reply["result"][0][0]
    assert top["document"]["id"] == "p1" and top["document"]["contents"].startswith('"Eiffel Tower"\n')
    assert isinstance(top["score"], float) and top["score"] > 0
    code, reply = post(port, json.dumps({"queries": ["Great Wall"]}).encode())
    assert code == 200 and reply["result"][0][0] == {"id": "p5", "contents": PASSAGES[4]["contents"]}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as health:
        assert json.loads(health.read())["passages"] == len(PASSAGES)
    docs = HTTPRetriever(f"http://127.0.0.1:{port}").search(["Amazon river", "Python language"], 2)
    assert [d[0].id for d in docs] == ["p4", "p3"] and docs[0][0].title == "Amazon River" and docs[0][0].score > 0


def test_server_answers_500_when_the_search_fails_and_keeps_serving(serve, small):
    class Flaky:
        name, docs = small.name, small.docs

        def search(self, queries, k):
            if queries == ["explode"]:
                raise RuntimeError("index corrupted")
            return small.search(queries, k)

    _, port = serve(Flaky())
    code, reply = post(port, b'{"queries": ["explode"]}')
    assert code == 500 and "index corrupted" in reply["error"]
    assert post(port, GOOD)[1]["result"][0][0]["id"] == "p2"


@pytest.mark.parametrize("body", [
    b'\xef\xbb\xbf{"queries": ["Everest"], "topk": 1}',                     # a UTF-8 byte-order mark
    '{"queries": ["Everest"], "topk": 1}'.encode("utf-16"),                 # UTF-16 (json.loads detects it)
    b'{"queries": ["\\ud800 Everest"], "topk": 1}',                         # a lone surrogate in a query
    b'{"queries": ["\xed\xa0\x80 Everest"], "topk": 1}',                    # the same, UTF-8-encoded (json allows it)
    b'{"queries": ["Everest\\u0000"], "topk": 1, "extra": {"x": [1, 2]}}',  # NUL, unknown keys
    b'{"queries": ["a"], "queries": ["Everest"], "topk": 1}',               # a repeated key: the last one
], ids=["bom", "utf-16", "lone-surrogate", "encoded-surrogate", "nul-and-extra-keys", "repeated-key"])
def test_odd_but_valid_bodies_are_answered(serve, small, body):
    _, port = serve(small)
    code, reply = post(port, body)
    assert code == 200 and reply["result"][0][0]["id"] == "p2"


def test_a_corpus_passage_with_a_lone_surrogate_still_gives_valid_json(serve, tmp_path):
    retriever = BM25Retriever(write_corpus(tmp_path / "c", [{"id": "s", "contents": '"S"\nodd \ud800 surrogate'}]))
    _, port = serve(retriever)
    code, reply = post(port, b'{"queries": ["surrogate"]}')
    assert code == 200 and reply["result"][0][0]["contents"] == '"S"\nodd \ud800 surrogate'


# ----------------------------------------------------------------------------- malformed bodies

NESTED = 50_000
MALFORMED = {   # name: (body, a phrase the error must hold)
    "deep-array": (b"[" * NESTED, "not valid JSON"),
    "deep-object": (b'{"a": ' * NESTED, "not valid JSON"),
    "deep-in-queries": (b'{"queries": ' + b"[" * NESTED + b"]" * NESTED + b"}", "not valid JSON"),
    "deep-in-ignored-key": (b'{"queries": ["a"], "x": ' + b"[" * NESTED + b"]" * NESTED + b"}", "not valid JSON"),
    "5000-digit-topk": (b'{"queries": ["a"], "topk": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    "5000-digit-ignored": (b'{"queries": ["a"], "x": ' + b"9" * 5000 + b"}", "not valid JSON"),
    "4000-digit-topk": (b'{"queries": ["a"], "topk": ' + b"9" * 4000 + b"}", "'topk'"),
    "float-overflow-topk": (b'{"queries": ["a"], "topk": 1e999}', "'topk'"),
    "nan-topk": (b'{"queries": ["a"], "topk": NaN}', "'topk'"),
    "float-topk": (b'{"queries": ["a"], "topk": 2.0}', "'topk'"),
    "bool-topk": (b'{"queries": ["a"], "topk": true}', "'topk'"),
    "string-topk": (b'{"queries": ["a"], "topk": "3"}', "'topk'"),
    "list-topk": (b'{"queries": ["a"], "topk": [3]}', "'topk'"),
    "zero-topk": (b'{"queries": ["a"], "topk": 0}', "'topk'"),
    "negative-topk": (b'{"queries": ["a"], "topk": -1}', "'topk'"),
    "topk-over-max": (b'{"queries": ["a"], "topk": 11}', "'topk'"),
    "number-return-scores": (b'{"queries": ["a"], "return_scores": 1}', "'return_scores'"),
    "string-return-scores": (b'{"queries": ["a"], "return_scores": "yes"}', "'return_scores'"),
    "invalid-utf8": (b'{"queries": ["\xc3\x28"]}', "not valid JSON"),
    "truncated-utf8": (b'{"queries": ["\xe2\x82"]}', "not valid JSON"),
    "utf16-bom-garbage": (b"\xff\xfe", "not valid JSON"),
    "utf16-bom-odd-byte": (b"\xff\xfe\xfd", "not valid JSON"),
    "not-json": (b"{not json", "not valid JSON"),
    "nul": (b"\x00", "not valid JSON"),
    "spaces": (b"   ", "not valid JSON"),
    "null": (b"null", "JSON object"),
    "number": (b"3", "JSON object"),
    "string": (b'"queries"', "JSON object"),
    "array": (b"[1, 2]", "JSON object"),
    "no-queries": (b'{"topk": 3}', "'queries'"),
    "null-queries": (b'{"queries": null}', "'queries'"),
    "string-queries": (b'{"queries": "one string"}', "'queries'"),
    "empty-queries": (b'{"queries": []}', "'queries'"),
    "null-query": (b'{"queries": [null]}', "'queries'"),
    "number-query": (b'{"queries": ["a", 3]}', "'queries'"),
    "nested-query": (b'{"queries": [["a"]]}', "'queries'"),
    "object-query": (b'{"queries": [{"q": "a"}]}', "'queries'"),
    "too-many-queries": (b'{"queries": ["a", "b", "c", "d", "e"]}', "at most 4 queries"),
    "too-many-passages": (b'{"queries": ["a", "b", "c"], "topk": 10}', "at most 20 per request (max_passages)"),
}


@pytest.mark.parametrize("body, phrase", MALFORMED.values(), ids=MALFORMED.keys())
def test_any_malformed_body_gets_400_json_and_no_traceback(serve, small, capfd, body, phrase):
    _, port = serve(small, topk_max=10, max_queries=4, max_passages=20)
    code, reply = post(port, body)
    assert code == 400 and phrase in reply["error"] and len(reply["error"]) < 300, reply
    assert post(port, GOOD)[1]["result"][0][0]["id"] == "p2"
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- methods and paths

OTHER_METHODS = ["PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "FOO"]
EXPECTED = {   # (method, path): (status, Allow header)
    ("GET", "/health"): (200, None), ("HEAD", "/health"): (200, None), ("POST", "/health"): (405, "GET, HEAD"),
    ("GET", "/retrieve"): (405, "POST"), ("HEAD", "/retrieve"): (405, "POST"), ("POST", "/retrieve"): (200, None),
    **{(m, "/nope"): (404, None) for m in ("GET", "HEAD", "POST")},
    **{(m, p): (405, "GET, HEAD, POST") for m in OTHER_METHODS for p in ("/health", "/retrieve", "/nope")},
}


@pytest.mark.parametrize("method, path", EXPECTED, ids=[f"{m}-{p}" for m, p in EXPECTED])
def test_every_method_on_every_path(serve, small, method, path):
    """Right status and Allow header; JSON bodies; HEAD gets GET's headers and no body, its 404 and 405 too."""
    _, port = serve(small)
    status, headers, body = exchange(port, http(method, path, GOOD if method in ("POST", "PUT", "PATCH") else b""))
    assert (status, headers.get("allow")) == EXPECTED[method, path]
    assert headers["content-type"] == "application/json"
    if method == "HEAD":
        assert body == b"" and int(headers["content-length"]) > 0
        if path != "/health":                    # (the health reply holds counts, which change)
            _, get_headers, get_body = exchange(port, http("GET", path))
            assert headers["content-length"] == str(len(get_body)) == get_headers["content-length"]
    else:
        reply = json.loads(body)
        assert int(headers["content-length"]) == len(body)
        assert ("result" in reply or "status" in reply) if status == 200 else "error" in reply


# ----------------------------------------------------------------------------- oversized and malformed requests

def retrieve_with(headers, body=b""):
    return http("POST", "/retrieve", body, headers)


REQUESTS = {   # name: (request bytes, status, a phrase of the error)
    "long-request-line": (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "longer than 65536"),
    "long-header-line": (retrieve_with({"X-Long": "a" * 70_000}, GOOD), 431, "Line too long"),
    "too-many-headers": (retrieve_with({f"X-{i}": "a" for i in range(101)}, GOOD), 431, "Too many headers"),
    "body-over-limit": (retrieve_with({"Content-Length": "2000000"}), 413, "at most 10000"),
    "no-content-length": (retrieve_with({}), 411, "Content-Length"),
    "chunked": (retrieve_with({"Transfer-Encoding": "chunked"}, b"5\r\nhello\r\n0\r\n\r\n"), 411, "Transfer-Encoding"),
    "length-not-a-number": (retrieve_with({"Content-Length": "abc"}), 400, "Content-Length"),
    "length-negative": (retrieve_with({"Content-Length": "-1"}), 400, "Content-Length"),
    "length-with-underscore": (retrieve_with({"Content-Length": "1_0"}), 400, "Content-Length"),
    "length-with-plus": (retrieve_with({"Content-Length": "+5"}), 400, "Content-Length"),
    "length-huge": (retrieve_with({"Content-Length": "9" * 40}), 400, "Content-Length"),
    "two-lengths": (b"POST /retrieve HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "one decimal"),
    "empty-body": (retrieve_with({"Content-Length": "0"}), 400, "not valid JSON"),
    "garbage-request-line": (b"GARBAGE\r\n\r\n", 400, "Bad request"),
    "four-word-request-line": (b"GET / x HTTP/1.1\r\n\r\n", 400, "Bad request"),
    "bad-version": (b"GET /health HTTP/9.x\r\n\r\n", 400, "Bad request version"),
    "http-2": (b"GET /health HTTP/2.0\r\n\r\n", 505, "Invalid HTTP version"),
    "control-characters": (b"G\x00T /h\x01 HTTP/1.1\r\n\r\n", 405, "not allowed"),
}


@pytest.mark.parametrize("request_bytes, status, phrase", REQUESTS.values(), ids=REQUESTS.keys())
def test_oversized_or_malformed_requests_get_json_errors(serve, small, capfd, request_bytes, status, phrase):
    _, port = serve(small, max_body_bytes=10_000)
    got, headers, body = exchange(port, request_bytes)
    assert got == status and headers["content-type"] == "application/json"
    assert phrase in json.loads(body)["error"]
    assert post(port, GOOD)[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_a_body_shorter_than_its_content_length_gets_400(serve, small):
    _, port = serve(small)
    status, _, body = exchange(port, retrieve_with({"Content-Length": "100"}, b'{"queries"'), half_close=True)
    assert status == 400 and "ended after 10 of its 100 bytes" in json.loads(body)["error"]


# ----------------------------------------------------------------------------- slow clients

def seconds_until_cut_off(port, prefix, chunks, limit=8.0, interval=0.1):
    """Send `prefix`, then the next of `chunks` every `interval` s: seconds until the server closed the
    connection, or `limit` if it never did."""
    chunks = iter(chunks)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(prefix)
        while time.monotonic() - t0 < limit:
            if select.select([sock], [], [], interval)[0]:         # EOF (or a reply): the server is done with us
                return time.monotonic() - t0
            try:
                sock.sendall(next(chunks, b""))
            except OSError:
                return time.monotonic() - t0
    return limit


def byte_by_byte(data):
    return [data[i:i + 1] for i in range(len(data))]


SLOW = {   # name: (sent at once, then one chunk every 0.1 s)
    "silent": (b"", []),
    "request-line": (b"", byte_by_byte(b"POST /" + b"a" * 1000)),
    "header-line": (b"POST /retrieve HTTP/1.1\r\n", byte_by_byte(b"X-Slow: " + b"a" * 1000)),
    "header-lines": (b"POST /retrieve HTTP/1.1\r\n", [b"X-%d: a\r\n" % i for i in range(1000)]),
    "body": (retrieve_with({"Content-Length": "5000"}), byte_by_byte(b'{"queries": ["a"' + b" " * 5000)),
}


@pytest.mark.parametrize("prefix, chunks", SLOW.values(), ids=SLOW.keys())
def test_a_slow_client_is_cut_off_at_the_deadline_and_frees_its_worker(serve, small, prefix, chunks):
    server, port = serve(small, workers=1, request_timeout=1.0)
    assert seconds_until_cut_off(port, prefix, chunks) < 1.0 + 1.5
    assert post(port, GOOD)[0] == 200          # the only worker is free again
    assert server.counts()["timeouts"] == 1


def test_a_client_that_stops_reading_the_reply_is_cut_off_and_frees_its_worker(serve, big):
    server, port = serve(big, workers=1, request_timeout=1.0)
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", port))
        slow.sendall(http("POST", "/retrieve", BIG))          # and never reads the 17 MB reply
        t0 = time.monotonic()
        status, reply = post(port, b'{"queries": ["Everest"]}')   # waits for the only worker
        assert status == 200 and reply["result"][0][0]["id"] == "p2"
        assert time.monotonic() - t0 < 1.0 + 2.5
        assert server.counts()["timeouts"] == 1


# ----------------------------------------------------------------------------- clients that vanish

@pytest.mark.parametrize("read_first", [1000, 0], ids=["mid-reply", "before-the-reply"])
def test_clients_that_vanish_are_counted_without_a_traceback(serve, big, capfd, read_first):
    server, port = serve(big, workers=2)
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(http("POST", "/retrieve", BIG))
        if read_first:
            assert sock.recv(read_first)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()                               # a reset: the server's next write fails
    assert wait_for(lambda: server.counts().get("disconnects", 0) == 3), server.counts()
    assert post(port, b'{"queries": ["Everest"]}')[0] == 200
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- the worker pool and the backlog

def test_connections_beyond_the_pool_wait_in_the_backlog_not_in_threads(serve, small):
    server, port = serve(small, workers=2, request_timeout=10.0)
    time.sleep(0.1)
    threads_before = threading.active_count()
    busy = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]        # hold both workers
    assert wait_for(lambda: threading.active_count() >= threads_before + 2)
    # more connections than workers: the kernel accepts them into the backlog, so connect() returns at once
    waiting = [socket.create_connection(("127.0.0.1", port), timeout=0.5) for _ in range(100)]
    time.sleep(0.3)
    assert threading.active_count() - threads_before <= 2 * 2     # 2 workers + their deadline timers, no more
    for sock in waiting:
        sock.sendall(http("POST", "/retrieve", GOOD))
    for sock in busy:
        sock.close()
    replies = []
    for sock in waiting:
        with sock:
            sock.settimeout(10)
            replies.append(read_reply(sock)[0])
    assert replies == [200] * 100
    assert server.counts()["ok"] == 100


def test_a_stalled_client_does_not_block_others(serve, small):
    _, port = serve(small)
    with socket.create_connection(("127.0.0.1", port)) as stalled:
        stalled.sendall(retrieve_with({"Content-Length": "100"}, b"{"))
        assert post(port, GOOD)[0] == 200


def test_shutdown_returns_while_every_worker_is_busy(small):
    server = make_server(small, "127.0.0.1", 0, workers=1, request_timeout=30.0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]
    busy = socket.create_connection(("127.0.0.1", port))         # holds the worker
    queued = socket.create_connection(("127.0.0.1", port))       # the accept loop waits for a worker with this one
    time.sleep(0.3)
    t0 = time.monotonic()
    server.shutdown()
    server.server_close()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 2.0
    assert read_reply(queued)[0] == 0                              # closed unanswered
    busy.close()
    queued.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
