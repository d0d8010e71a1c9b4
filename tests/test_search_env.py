"""Tests of the search environment (retrievers.py and tools.py): corpus parsing, BM25 and its on-disk index, the
/retrieve client, Serper parsing, browsing and its refusals, the query cache, and fault injection (the server's
tests are in test_retrieval_server.py, hostile pages and replies in test_hostile.py).

Everything runs offline against servers started here on 127.0.0.1.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import net
from atomic_thought import ToolCall
from retrievers import (BM25Retriever, CachedRetriever, Doc, HTTPRetriever, QueryCache, SearchError,
                        SerperRetriever, parse_corpus)
from tools import BrowseRefused, Tools, fetch_page, page_paragraphs

REPO = Path(__file__).resolve().parent.parent

PASSAGES = [
    {"id": "p1", "contents": '"Eiffel Tower"\nThe Eiffel Tower is a wrought-iron lattice tower in Paris, built 1889.'},
    {"id": "p2", "contents": '"Mount Everest"\nMount Everest is the highest mountain above sea level, in Asia.'},
    {"id": "p3", "contents": '"Python (language)"\nPython is a programming language created by Guido van Rossum.'},
    {"id": "p4", "title": "Amazon River", "text": "The Amazon is the largest river by discharge volume of water."},
    {"id": "p5", "contents": '"Great Wall"\nThe Great Wall of China was built over many centuries by dynasties.'},
]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PASSAGES) + "\n")
    return path


def serve_in_thread(server):
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def local_http():
    """Start a loopback server whose replies come from `respond(handler) -> (code, content_type, body)`."""
    servers = []

    def start(respond):
        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.request_body = self.rfile.read(length)
                code, ctype, body = respond(self)
                self.send_response(code)
                for name, value in ({"Content-Type": ctype} if isinstance(ctype, str) else ctype).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up first (timeouts, size limits): what those tests want
            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        servers.append(server)
        return serve_in_thread(server)
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def free_port():
    """A port nothing listens on (bound then released): connections to it are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeRetriever:
    name = "fake"

    def __init__(self, results):
        self.results, self.calls = results, []

    def search(self, queries, k):
        self.calls.append(list(queries))
        return [list(self.results.get(q, []))[:k] for q in queries]


# ----------------------------------------------------------------------------- corpus and BM25

def test_parse_corpus_formats_and_errors():
    docs = parse_corpus(b'{"id": 7, "contents": "\\"T\\"\\nbody text"}\n\n{"title": "A", "text": "b"}\n', "c.jsonl")
    assert [(d.id, d.title, d.text) for d in docs] == [("7", "T", "body text"), ("1", "A", "b")]
    with pytest.raises(ValueError, match=r"c\.jsonl line 2: not valid JSON"):
        parse_corpus(b'{"id": 1, "contents": "x"}\n{oops\n', "c.jsonl")
    with pytest.raises(ValueError, match=r"line 1: needs a string 'contents'"):
        parse_corpus(b'{"id": 1, "body": "x"}\n', "c.jsonl")
    with pytest.raises(ValueError, match="no passages"):
        parse_corpus(b"\n\n", "c.jsonl")


def test_bm25_ranks_the_right_passage_first(corpus):
    retriever = BM25Retriever(corpus)
    results = retriever.search(["highest mountain in the Himalayas", "who created the Python programming language",
                                "largest river discharge", "zzzunknownword"], k=3)
    assert [r[0].id for r in results[:3]] == ["p2", "p3", "p4"]
    assert results[0][0].title == "Mount Everest" and results[0][0].score > 0
    assert results[3] == []  # no query term occurs anywhere: no result rather than arbitrary passages
    assert all(len(r) <= 3 for r in results)


def test_bm25_index_is_cached_and_rebuilt_when_the_corpus_changes(corpus):
    first = BM25Retriever(corpus)
    assert first.index_built and first.index_dir.parent == corpus.parent
    mtime = (first.index_dir / "params.index.json").stat().st_mtime_ns
    second = BM25Retriever(corpus)
    assert not second.index_built and second.index_dir == first.index_dir
    assert (second.index_dir / "params.index.json").stat().st_mtime_ns == mtime
    assert second.search(["Eiffel tower Paris"], 1)[0][0].id == "p1"
    corpus.write_text(corpus.read_text() + json.dumps({"id": "p6", "title": "Moon", "text": "The Moon orbits."}) + "\n")
    third = BM25Retriever(corpus)
    assert third.index_built and third.index_dir != first.index_dir
    assert third.search(["moon orbits"], 1)[0][0].id == "p6"


def test_bm25_index_goes_to_user_cache_when_corpus_folder_is_read_only(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    os.chmod(corpus.parent, 0o555)
    try:
        retriever = BM25Retriever(corpus)
    finally:
        os.chmod(corpus.parent, 0o755)
    assert retriever.index_dir.is_relative_to(tmp_path / "xdg" / "atom_searcher" / "bm25")
    assert not list(corpus.parent.glob("corpus.jsonl.bm25-*"))


# ----------------------------------------------------------------------------- Serper

SERPER_REPLY = {"searchParameters": {"q": "x"}, "organic": [
    {"title": "Mount Everest - Wikipedia", "link": "https://en.wikipedia.org/wiki/Mount_Everest",
     "snippet": "Mount Everest is Earth's highest mountain above sea level.", "position": 1},
    {"title": "No link here", "snippet": "skipped"},
    {"title": "Everest facts", "link": "https://example.org/everest", "position": 3},
]}


def test_serper_parsing_and_key_handling(local_http, monkeypatch):
    secret = "sk-test-SECRET-0123456789"
    seen = []

    def respond(handler):
        seen.append((handler.headers.get("X-API-KEY"), json.loads(handler.request_body)))
        return 200, "application/json", json.dumps(SERPER_REPLY).encode()
    endpoint = local_http(respond) + "/search"
    monkeypatch.setenv("SERPER_API_KEY", secret)
    serper = SerperRetriever(endpoint=endpoint, backoff_s=0.01)
    docs = serper.search(["everest height", "everest facts"], k=5)
    assert sorted(seen, key=str) == [(secret, {"q": "everest facts", "num": 5}),
                                     (secret, {"q": "everest height", "num": 5})]
    assert [(d.title, d.url, d.text) for d in docs[0]] == [
        ("Mount Everest - Wikipedia", "https://en.wikipedia.org/wiki/Mount_Everest",
         "Mount Everest is Earth's highest mountain above sea level."),
        ("Everest facts", "https://example.org/everest", "")]
    assert secret not in repr(serper) and secret not in str(vars(serper))

    # failures never carry the key: connection refused, HTTP 500, HTTP 403
    for target in [f"http://127.0.0.1:{free_port()}/search",
                   local_http(lambda h: (500, "application/json", b"{}")),
                   local_http(lambda h: (403, "application/json", b'{"message": "bad key"}'))]:
        with pytest.raises(SearchError) as info:
            SerperRetriever(endpoint=target, retries=1, backoff_s=0.01).search(["q"], 3)
        text = "".join(traceback.format_exception(info.value)) + repr(info.value)
        assert secret not in text and "serper" in str(info.value)

    monkeypatch.delenv("SERPER_API_KEY")
    with pytest.raises(ValueError, match="SERPER_API_KEY"):
        SerperRetriever(endpoint=endpoint)


# ----------------------------------------------------------------------------- browse

PAGE = """<html><head><title>Tower facts</title><style>.x { color: red }</style>
<script>var secretScript = "do not show";</script></head><body>
<nav>Home | About</nav>
<p>The tower was designed by the engineering company of Gustave Eiffel.</p>
<p>Its height is 330 metres, and it was the tallest structure in the world until 1930.</p>
<div>Visitors can climb stairs to the second floor.</div>
<p>The restaurant on the first floor serves lunch &amp; dinner.</p>
<p>Gift shops sell small models.</p><p>Tickets can be bought online.</p><p>Other paragraph.</p>
</body></html>"""


@pytest.fixture
def page_server(local_http):
    def respond(handler):
        if handler.path == "/tower.html":
            return 200, "text/html; charset=utf-8", PAGE.encode()
        if handler.path == "/to-file":
            return 302, {"Location": "file:///etc/passwd", "Content-Type": "text/html"}, b""
        if handler.path == "/image.png":
            return 200, "image/png", b"\x89PNG"
        if handler.path == "/big.txt":
            return 200, "text/plain", b"early words here\n" + b"x " * 200_000 + b"\nlate needle paragraph\n"
        return 404, "text/html", b"not found"
    return local_http(respond)


def browse(tools, urls, query, seen):
    return tools.run([ToolCall("browse_webpage", {"url_list": urls, "query": query})], [set(seen)])[0]


def test_browse_returns_the_relevant_paragraphs(page_server):
    tools = Tools(FakeRetriever({}), browse_allow_private=True, browse_paragraphs=2)
    url = page_server + "/tower.html"
    text = browse(tools, [url], "how tall is the tower height metres", [url])
    assert "330 metres" in text and text.startswith(f"[{url}]")
    assert "secretScript" not in text and "color: red" not in text and "Gift shops" not in text
    text = browse(tools, [url], "restaurant lunch", [url])
    assert "lunch & dinner" in text  # character references decoded
    assert tools.stats["browse_calls"] == 2 and tools.stats["browse_failures"] == 0
    paragraphs = page_paragraphs(PAGE, is_html=True)
    assert paragraphs[:2] == ["Tower facts", "Home | About"] and len(paragraphs) == 9
    assert not any("secretScript" in p or "color" in p for p in paragraphs)


def test_browse_failures_and_limits(page_server):
    tools = Tools(FakeRetriever({}), browse_allow_private=True, browse_max_bytes=10_000)
    urls = [page_server + p for p in ("/missing", "/image.png", "/to-file", "/big.txt")]
    text = browse(tools, urls, "needle", urls)
    assert "[only the first 3 URLs are read]" in text
    assert f"[{urls[0]}] browse failed: HTTP 404" in text
    assert f"[{urls[1]}] browse failed: unsupported content type image/png" in text
    assert f"[{urls[2]}] refused: only http(s)" in text  # a redirect target is checked like the URL itself
    assert tools.stats["browse_failures"] == 2 and tools.stats["browse_refused"] == 1
    text = browse(tools, [urls[3]], "needle", [urls[3]])
    assert "early words" in text and "late needle" not in text  # cut at browse_max_bytes


def test_browse_refuses_unseen_and_local_urls(page_server):
    tools = Tools(FakeRetriever({}))  # browse_allow_private=False: the default
    local = page_server + "/tower.html"
    refused = [local, "http://localhost/x", "http://10.1.2.3/", "http://169.254.169.254/latest/meta-data",
               "http://[::1]/", "http://[::ffff:127.0.0.1]/", "file:///etc/passwd", "ftp://example.org/f"]
    text = browse(tools, refused[:3], "tower", refused)
    text += browse(tools, refused[3:6], "tower", refused) + browse(tools, refused[6:], "tower", refused)
    assert text.count("refused") == len(refused) and "330 metres" not in text
    assert tools.stats["browse_refused"] == len(refused)
    text = browse(Tools(FakeRetriever({}), browse_allow_private=True), [local], "tower", ["http://other/"])
    assert "refused: not among this conversation's search results" in text and "330" not in text


def test_browse_with_a_reader_llm(page_server, local_http, monkeypatch):
    requests_seen = []

    def reader(handler):
        requests_seen.append((handler.path, handler.headers.get("Authorization"), json.loads(handler.request_body)))
        return 200, "application/json", json.dumps({"choices": [{"message": {"content": " The tower is 330 m. "}}]}
                                                   ).encode()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-reader")
    url = page_server + "/tower.html"
    tools = Tools(FakeRetriever({}), browse_allow_private=True, reader_url=local_http(reader) + "/v1",
                  reader_model="reader-model")
    assert browse(tools, [url], "tower height", [url]) == "The tower is 330 m."
    path, auth, body = requests_seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-reader" and body["model"] == "reader-model"
    assert "Query: tower height" in body["messages"][1]["content"] and "330 metres" in body["messages"][1]["content"]

    broken = Tools(FakeRetriever({}), browse_allow_private=True, reader_url=f"http://127.0.0.1:{free_port()}",
                   reader_model="m")
    text = browse(broken, [url], "tower height", [url])
    assert text.startswith("[reader failed: reader: connection failed") and "330 metres" in text
    assert broken.stats["reader_failures"] == 1
    with pytest.raises(ValueError, match="reader_model"):
        Tools(FakeRetriever({}), reader_url="http://x")


def test_browse_guard_checks_every_resolved_address(monkeypatch):
    """One private address among a host's answers refuses it, before any connection is tried."""
    answers = {"mixed.example": ["93.184.216.34", "192.168.1.5"], "mapped.example": ["::ffff:127.0.0.1"]}
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, **kw: [
        (socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
        for ip in answers[host]])
    monkeypatch.setattr(net, "create_connection", lambda *a, **k: pytest.fail("a refused host was connected to"))
    session = net.session(2, guard=net.public_only)
    for host in answers:
        with pytest.raises(BrowseRefused, match="private"):
            fetch_page(f"https://{host}/page", session=session, timeout=5, max_bytes=1000)


# ----------------------------------------------------------------------------- web_search tool

def test_web_search_formats_truncates_and_records_urls():
    docs = [Doc("1", "First", "alpha beta gamma", url="https://a.example/1"), Doc("2", "Second", "delta epsilon")]
    retriever = FakeRetriever({"q": docs, "other": docs[1:]})
    tools = Tools(retriever, topk=5)
    seen = [set(), set(), set()]
    calls = [ToolCall("web_search", {"query": "q"}), ToolCall("web_search", {"query": " q "}),
             ToolCall("web_search", {"query": "nothing"})]
    out = tools.run(calls, seen)
    assert out[0] == out[1] == "[1] First\nURL: https://a.example/1\nalpha beta gamma\n\n[2] Second\ndelta epsilon"
    assert out[2] == "[no results for: nothing]"
    assert retriever.calls == [["q", "nothing"]]  # one batched call, duplicates asked once
    assert seen == [{"https://a.example/1"}, {"https://a.example/1"}, set()]
    assert tools.stats == Counter(search_calls=3, empty_results=1)

    short = Tools(retriever, max_response_tokens=5).run([calls[0]], [set()])[0]
    assert short == "[1] First\nURL: https://a.example/1\nalpha ...[truncated]"

    class CharTokenizer:
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]

        def decode(self, ids):
            return "".join(map(chr, ids))
    assert Tools(retriever, max_response_tokens=7, tokenizer=CharTokenizer()).run(
        [calls[0]], [set()])[0] == "[1] Fir ...[truncated]"


def test_bad_tool_calls_become_error_text():
    tools = Tools(FakeRetriever({}))
    out = tools.run([ToolCall("web_search", {"query": 3}), ToolCall("web_search", {}),
                     ToolCall("browse_webpage", {"url_list": "http://x", "query": "q"}),
                     ToolCall("calculator", {"x": 1})], [set(), set(), set(), set()])
    assert out[0] == out[1] == "[web_search failed: 'query' must be a non-empty string]"
    assert out[2].startswith("[browse_webpage failed: needs 'url_list'") and out[3].startswith("[unknown tool")
    assert tools.stats["bad_arguments"] == 3 and tools.stats["unknown_tool"] == 1
    with pytest.raises(ValueError, match="2 tool calls but 1 seen_urls"):
        tools.run([ToolCall("web_search", {"query": "a"})] * 2, [set()])


# ----------------------------------------------------------------------------- query cache

def test_query_cache_hits_and_expiry(tmp_path):
    now = [1000.0]
    cache = QueryCache(tmp_path / "cache.sqlite", ttl_s=60, clock=lambda: now[0])
    inner = FakeRetriever({"a": [Doc("1", "T", "x", url="https://u", score=2.5)], "b": []})
    tools = Tools(inner, cache=cache)
    first = tools.run([ToolCall("web_search", {"query": "a"}), ToolCall("web_search", {"query": "b"})], [set(), set()])
    second = tools.run([ToolCall("web_search", {"query": "a"}), ToolCall("web_search", {"query": "b"})], [set(), set()])
    assert first == second and "URL: https://u" in first[0]
    assert inner.calls == [["a", "b"], ["b"]]  # "a" served from the cache; the empty "b" was not cached
    assert tools.stats["cache_hits"] == 1 and tools.stats["cache_misses"] == 3
    assert cache.get("fake", "a", 10) == [Doc("1", "T", "x", url="https://u", score=2.5)]
    assert cache.get("fake", "a", 5) is None and cache.get("other", "a", 10) is None  # k and backend are in the key
    now[0] += 61
    assert cache.get("fake", "a", 10) is None
    CachedRetriever(inner, cache).search(["a"], 10)
    assert inner.calls[-1] == ["a"]  # expired: asked again


WRITER = """
import sys
from retrievers import Doc, QueryCache
cache = QueryCache(sys.argv[1])
for n in range(150):
    cache.put("bm25", 10, [(f"shared {n}", [Doc(str(n), "t", sys.argv[2])]),
                           (f"{sys.argv[2]} {n}", [Doc("x", "t", "y")])])
print("done")
"""


def test_query_cache_two_processes_write_concurrently(tmp_path):
    path = tmp_path / "cache.sqlite"
    QueryCache(path)
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), name], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for name in ("one", "two")]
    for writer in writers:
        out, err = writer.communicate(timeout=60)
        assert writer.returncode == 0 and out.strip() == "done", err
    cache = QueryCache(path)
    for n in (0, 77, 149):
        assert cache.get("bm25", f"one {n}", 10) and cache.get("bm25", f"two {n}", 10)
        assert cache.get("bm25", f"shared {n}", 10)[0].text in ("one", "two")


# ----------------------------------------------------------------------------- fault injection

def slow(handler):
    time.sleep(1.0)
    return 200, "application/json", b'{"result": [[]]}'


@pytest.mark.parametrize("fault, respond, message", [
    ("down", None, "connection failed (after 2 attempts)"),
    ("timeout", slow, "timeout (after 2 attempts)"),
    ("http 500", lambda h: (500, "text/plain", b"boom"), "HTTP 500 ('boom') (after 2 attempts)"),
    ("http 404", lambda h: (404, "text/plain", b"nope"), "HTTP 404"),
    ("bad json", lambda h: (200, "application/json", b"{truncated"), "malformed JSON"),
    ("bad shape", lambda h: (200, "application/json", b'{"result": [[{"document": 5}], []]}'), "malformed reply"),
    ("wrong count", lambda h: (200, "application/json", b'{"result": []}'), "malformed reply"),
])
def test_search_faults_become_tool_errors(local_http, fault, respond, message):
    url = f"http://127.0.0.1:{free_port()}" if respond is None else local_http(respond)
    tools = Tools(HTTPRetriever(url, timeout=0.2, retries=1, backoff_s=0.01))
    calls = [ToolCall("web_search", {"query": "a"}), ToolCall("web_search", {"query": "b"})]
    out = tools.run(calls, [set(), set()])
    assert all(text.startswith("[search failed: retrieval server") and message in text for text in out), out
    assert tools.stats["search_failures"] == 2 and tools.stats["search_calls"] == 2


def test_empty_results_and_a_later_recovery(local_http):
    found = json.dumps({"result": [[{"id": "9", "contents": '"T"\nbody'}]]}).encode()
    replies = iter([(500, "text/plain", b"x"), (200, "application/json", b'{"result": [[]]}'),
                    (200, "application/json", found)])
    tools = Tools(HTTPRetriever(local_http(lambda h: next(replies)), retries=0, backoff_s=0.01))
    texts = [tools.run([ToolCall("web_search", {"query": "q"})], [set()])[0] for _ in range(3)]
    assert texts == ["[search failed: retrieval server " + texts[0].split("server ", 1)[1], "[no results for: q]",
                     "[1] T\nbody"]
    assert "HTTP 500" in texts[0]
    assert tools.stats == Counter(search_calls=3, search_failures=1, empty_results=1)


def test_http_retriever_splits_a_batch_within_the_server_limits(local_http):
    seen = []

    def respond(handler):
        request = json.loads(handler.request_body)
        seen.append((len(request["queries"]), request["topk"]))
        return 200, "application/json", json.dumps({"result": [[] for _ in request["queries"]]}).encode()
    retriever = HTTPRetriever(local_http(respond), max_queries=4, max_passages=9)
    assert retriever.search([f"q{i}" for i in range(7)], 3) == [[]] * 7
    assert seen == [(3, 3), (3, 3), (1, 3)]                        # 9 // 3 = 3 queries per request
