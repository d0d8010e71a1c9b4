"""The rule for what comes from the network (net.py, tools.py, retrievers.py): hostile pages and server
replies - malformed, mis-declared, redirecting, slow, huge - become failed tool calls, counted, never an exception
out of `Tools.run` or `rollout`, never a call past its deadline, never a connection the address guard refused.

Everything runs against real sockets on loopback (tests/hostile_server.py sends any bytes at all)."""
from __future__ import annotations

import gzip
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import net
import toy_world as tw
from atomic_thought import ToolCall, system_prompt
from engine import SamplingParams
from evaluate import AnswerJudge
from hostile_server import RawServer, http
from retrievers import Doc, HTTPRetriever, SearchError, SerperRetriever
from rrm_reward import HTTPJudgeRRM
from tools import BrowseError, BrowseRefused, fetch_page, Tools
from search_env import prompt_ids, rollout
from teacher_data import ChatTeacherEngine
from test_rollout import ScriptedEngine
from test_rrm_reward import traj

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)


class NoResults:
    name = "none"

    def search(self, queries, k):
        return [[] for _ in queries]


# ----------------------------------------------------------------------------- hostile pages

def hostile_pages() -> dict[str, list]:
    """Named raw replies: every decoder, parser and protocol failure a page can cause."""
    html = b"<html><body><p>tower height 330 metres</p></body></html>"
    pages = {f"charset-{i}": [http("200 OK", {"Content-Type": f"text/html; charset={cs}"}, b"\xff\xfe<p>x\x00\xd8</p>")]
             for i, cs in enumerate(["undefined", "idna", "utf-16", "utf-32", "rot13", "hex", "base64", "zlib", "bogus", "",
                        '"utf-8', "unicode_escape", "raw_unicode_escape", "punycode", "uu", "utf-7", "mbcs",
                        "utf_8_sig", "x-user-defined", "a" * 500])}
    for i, location in enumerate(["http://[::1", "http://[::1]:99999/", "http://%zz/", "file:///etc/passwd",
                                  "javascript:alert(1)", "", "http://\x00/", "//\\evil", "http://a:b@[", " ",
                                  "http://999.999.999.999/", "http://[fe80::1%25eth0]/", "http://" + "a" * 300 + ".com/",
                                  "http://xn--/", "http://\u00fc\u00df.com/", "http://a..b/", "\r\nX: y"]):
        pages[f"redirect-{i}"] = [http("302 Found", [("Location", location)], b"")]
    pages["redirect-loop"] = [http("301 Moved", {"Location": "/redirect-loop"}, b"")]
    pages["redirect-no-location"] = [http("302 Found", {}, b"")]
    pages |= {
        "status-999": [http("999 WHAT", {"Content-Type": "text/html"}, html)],
        "no-status-line": [b"garbage\r\n\r\n" + html],
        "empty-reply": [b""],
        "http-0.9": [html],
        "many-headers": [b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 300 + b"\r\n" + html],
        "long-header": [b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 200_000 + b"\r\n\r\n" + html],
        "negative-length": [http("200 OK", {"Content-Type": "text/html", "Content-Length": "-5"}, html, length=False)],
        "bad-length": [http("200 OK", {"Content-Type": "text/html", "Content-Length": "abc"}, html, length=False)],
        "short-body": [http("200 OK", {"Content-Type": "text/html", "Content-Length": "100000"}, html, length=False)],
        "bad-chunk": [http("200 OK", {"Content-Type": "text/html", "Transfer-Encoding": "chunked"},
                           b"zz\r\nabc\r\n", length=False)],
        "cut-chunk": [http("200 OK", {"Content-Type": "text/html", "Transfer-Encoding": "chunked"},
                           b"ffff\r\nabc", length=False)],
        "bad-gzip": [http("200 OK", {"Content-Type": "text/html", "Content-Encoding": "gzip"}, b"\x1f\x8bnot gzip")],
        "gzip-bomb": [http("200 OK", {"Content-Type": "text/html", "Content-Encoding": "gzip"},
                           gzip.compress(b"<p>" + b"a" * 50_000_000))],
        "many-encodings": [http("200 OK", {"Content-Type": "text/html", "Content-Encoding": "gzip, " * 50 + "gzip"},
                                html)],
        "binary": [http("200 OK", {"Content-Type": "application/octet-stream"}, bytes(range(256)))],
        "deep-tags": [http("200 OK", {"Content-Type": "text/html"}, b"<div>" * 200_000)],
        "bad-markup": [http("200 OK", {"Content-Type": "text/html"},
                            b"<![ <! </ <!-- <a href='x <script>&#99999999999; &#x110000; &#0; \xed\xa0\x80 <?x")],
        "nul-bytes": [http("200 OK", {"Content-Type": "text/plain"}, b"\x00" * 100_000)],
        "one-huge-line": [http("200 OK", {"Content-Type": "text/plain"}, b"a" * 5_000_000)],
        "many-paragraphs": [http("200 OK", {"Content-Type": "text/html"}, b"<p>tower a</p>" * 150_000)],
        "reset-mid-body": [b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 9999\r\n\r\n<p>a"],
    }
    return pages


SLOW = {   # each would hold a call past its deadline without one
    "trickle-headers": [p for c in b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n" for p in (bytes([c]), 0.2)],
    "trickle-body": [b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"] + [p for _ in range(100) for p in (b" ", 0.2)],
    "silent": [30.0],
}


@pytest.fixture(scope="module")
def page_server():
    pages = hostile_pages() | SLOW
    server = RawServer(lambda path, body: pages.get(path.lstrip("/"), [http("404 Not Found", {}, b"")]))
    yield server, pages
    server.close()


def test_no_hostile_page_escapes_a_browse_call(page_server):
    server, pages = page_server
    # The slow pages need 8-30 s. A 2 MB read takes 0.01 s alone but up to 1.9 s while 7 other threads of this
    # process (the pool parsing big pages, the server) hold the GIL: 1 s made this test flaky (LOG.md).
    deadline = 5.0
    tools = Tools(NoResults(), browse_allow_private=True, browse_timeout=deadline, browse_max_bytes=2_000_000,
                  max_workers=8, max_response_tokens=10 ** 6)   # nothing cut: every page's outcome is in the text
    names = sorted(pages)
    calls, seen = [], []
    for i in range(0, len(names), 3):            # several URLs per call, several calls per batch
        urls = [f"{server.url}/{name}" for name in names[i:i + 3]]
        calls.append(ToolCall("browse_webpage", {"url_list": urls, "query": "tower height"}))
        seen.append(set(urls))
    t0 = time.monotonic()
    out = tools.run(calls, seen)
    elapsed = time.monotonic() - t0
    assert len(out) == len(calls) and all(isinstance(text, str) and text for text in out)
    assert tools.stats["tool_errors"] == 0, out          # every page was handled, none by the last-resort catch
    failed = sum(text.count("] browse failed: ") + text.count("] refused: ") for text in out)
    assert failed == tools.stats["browse_failures"] + tools.stats["browse_refused"]
    readable = {"bad-length", "negative-length", "deep-tags", "gzip-bomb", "many-paragraphs", "nul-bytes",
                "one-huge-line"}   # a usable page despite the lie (a bomb is cut at browse_max_bytes)
    joined = "".join(out)
    for name in names:
        ok = name.startswith("charset-") or name in readable      # an unusable charset falls back to UTF-8
        assert ok != (f"/{name}] browse failed: " in joined or f"/{name}] refused: " in joined), name
    for name in SLOW:
        assert f"/{name}] browse failed: timeout" in joined
    # the slow pages cost about one deadline each (at worst one after another), not their 8-30 s
    assert elapsed < len(SLOW) * deadline + 10, elapsed


@FUZZ
@given(status=st.sampled_from(["200 OK", "301 X", "302 X", "404 X", "500 X", "999 X", "200"]),
       headers=st.lists(st.tuples(st.sampled_from(["Content-Type", "Location", "Content-Encoding", "Content-Length",
                                                   "Transfer-Encoding", "X"]),
                                  st.text(st.characters(max_codepoint=255, blacklist_characters="\r\n"), max_size=40)),
                        max_size=4),
       body=st.binary(max_size=3000) | st.text(max_size=500).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzzed_replies_never_escape_a_browse_call(page_server, status, headers, body):
    server, pages = page_server
    pages["fuzz"] = [http(status, [("Content-Type", "text/html")] + headers, body, length=False)]
    tools = Tools(NoResults(), browse_allow_private=True, browse_timeout=1.0)
    url = f"{server.url}/fuzz"
    [text] = tools.run([ToolCall("browse_webpage", {"url_list": [url], "query": "q"})], [{url}])
    assert isinstance(text, str) and tools.stats["tool_errors"] == 0, text


# ----------------------------------------------------------------------------- hostile JSON APIs

def hostile_json() -> list[bytes]:
    """Reply bodies of a JSON API: malformed, deep, huge numbers, wrong shapes and types."""
    return [b"", b"{", b"[" * 100_000, b'{"result": ' + b"[" * 50_000, b"1" * 5000, b'{"a": ' + b"9" * 5000 + b"}",
            b"NaN", b'{"result": [[{"document": {"contents": "x"}, "score": 1e999}]]}', b"\xff\xfe{}",
            b'"\\ud800"', b"null", b"[]", b'{"result": [[null]]}', b'{"result": [[{"id": ' + b"7" * 5000 + b"}]]}",
            b'{"result": {"a": 1}}', b'{"choices": [{"message": {"content": ["x"]}}]}', b'{"choices": "x"}',
            b'{"choices": [{"message": null}]}', b'{"organic": [{"link": 5}, {"link": "http://x/", "title": []}]}',
            b'{"organic": {"x": 1}}', b'{"choices": [{"message": {"content": "' + b"{" * 10_000 + b'"}}]}',
            b'{"result": [[{"id": "1", "contents": "\\"T\\"\\nlone \\ud800 q"}]], "organic": [{"link": "http://x/",'
            b' "snippet": "\\udfff q"}], "choices": [{"message": {"content": "\\ud800"}}]}']


def json_server(bodies: list[bytes]):
    """Each request gets the next body (cycling), as a 200 JSON reply; '/slow' trickles."""
    counter = iter(range(10 ** 9))

    def script(path, request):
        if path.endswith("slow"):
            return SLOW["trickle-body"]
        return [http("200 OK", {"Content-Type": "application/json"}, bodies[next(counter) % len(bodies)])]
    return RawServer(script)


def test_hostile_retrieval_replies_fail_the_search_and_are_counted():
    bodies = hostile_json()
    server = json_server(bodies)
    tools = Tools(HTTPRetriever(server.url, timeout=2.0, retries=0, max_reply_bytes=1 << 20), topk=3)
    for _ in bodies:
        [text] = tools.run([ToolCall("web_search", {"query": "q"})], [set()])
        assert isinstance(text, str)
    assert tools.stats["search_failures"] + tools.stats["empty_results"] == len(bodies) - 2   # two replies are valid
    assert tools.stats["tool_errors"] == 0
    server.close()


@pytest.fixture(scope="module")
def toy():
    world = tw.build_world(0, tw.WorldConfig(n_train=10, n_dev=2, n_test=4, n_extra_people=10))
    return world, tw.build_tokenizer(world)


def test_hostile_judge_reader_serper_teacher_and_answer_judge_replies_never_raise(monkeypatch, toy):
    world, tokenizer = toy
    ids = prompt_ids(tokenizer, world.splits["test"][0]["question"], system_prompt())
    bodies = hostile_json()
    server = json_server(bodies)
    teacher = ChatTeacherEngine(server.url, "m", tokenizer, retries=0, timeout=2.0)
    monkeypatch.setenv("SERPER_API_KEY", "k" * 32)
    serper = SerperRetriever(endpoint=server.url, retries=0, timeout=2.0)
    judge = HTTPJudgeRRM(server.url, "m", max_retries=0, timeout_s=2.0)
    answers = AnswerJudge(server.url, "m", retries=0, timeout=2.0)
    reader = Tools(NoResults(), reader_url=server.url + "/v1", reader_model="m", reader_timeout=2.0)
    for _ in bodies:
        [completion] = teacher.generate([ids], SamplingParams(max_new_tokens=50))
        assert completion.error is None or completion.error.startswith("teacher")
        try:
            serper.search(["q"], 3)
        except SearchError:
            pass
        [atr] = judge.score([traj([("OBSERVATION", "x")])])
        assert atr.value is not None
        assert answers.judge([("q", ["a"], "a")])[0] in ("correct", "incorrect", "unparseable", "error")
        try:
            reader._read("page text", "q")
        except net.RemoteError:
            pass
    server.close()


def test_rollout_survives_a_retrieval_server_that_answers_garbage(toy):
    world, tokenizer = toy
    server = json_server(hostile_json())
    tools = Tools(HTTPRetriever(server.url, timeout=2.0, retries=0), topk=3, max_response_tokens=100,
                  tokenizer=tokenizer)
    questions = world.splits["test"][:4]
    trajs = rollout(ScriptedEngine(tokenizer, questions, always_search=True), tools, questions, tokenizer=tokenizer,
                    params=SamplingParams(max_new_tokens=300), group_size=2, max_turns=4, max_context=4096)
    assert len(trajs) == 8 and all(t.finish for t in trajs)
    responses = [r for t in trajs for r in t.tool_responses]
    assert responses and any(r.startswith("[search failed") for r in responses)
    assert tools.stats["tool_errors"] == 0
    server.close()


# ----------------------------------------------------------------------------- total deadlines

@pytest.mark.parametrize("slow", sorted(SLOW))
def test_every_client_call_has_a_total_deadline(page_server, slow):
    server, _ = page_server
    url = f"{server.url}/{slow}"
    t0 = time.monotonic()
    with pytest.raises(net.RemoteError, match="timeout"):
        net.post_json(net.session(1), url, {}, what="x", timeout=1.0, retries=1, backoff_s=0.1)
    assert time.monotonic() - t0 < 2 * 1.0 + 0.1 + 1.0
    t0 = time.monotonic()
    with pytest.raises(BrowseError, match="timeout"):
        fetch_page(url, session=net.session(1), timeout=1.0, max_bytes=10_000)
    assert time.monotonic() - t0 < 1.0 + 1.0


# ----------------------------------------------------------------------------- the address guard

LOOPBACK_HOSTS = ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0177.0.0.1", "0x7f.0.0.1", "127.000.000.001",
                  "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:0:0:1]", "localhost", "LOCALHOST",
                  "localhost.", "127.0.0.1.", "0.0.0.0", "0", "[::]", "%31%32%37.0.0.1", "127%2e0%2e0%2e1",
                  "\uff11\uff12\uff17.0.0.1", "127\u30020\u30020\u30021", "[::1%25lo]", "[fe80::1%25lo]"]


def hostile_urls(host: str, port: int, decoy: str) -> list[str]:
    """URL forms that one parser reads as `decoy` and another as `host:port` (or that simply name host:port)."""
    hp = f"{host}:{port}"
    return [f"http://{hp}/", f"http://{hp}\\@{decoy}/", f"http://{decoy}\\@{hp}/", f"http://{hp}#@{decoy}/",
            f"http://{hp}?@{decoy}/", f"http://{decoy}#@{hp}/", f"http://user:pw@{hp}/", f"http://{decoy}@{hp}/",
            f"http://{decoy}:80@{hp}/", f"http://a%40b@{hp}/", f"http:/\\{hp}/", f"http:\\\\{hp}/", f"http:{hp}/",
            f"HTTP://{hp}/", f"http://{hp}\t/", f"http:///{hp}/", f"http://{hp}%2f@{decoy}/", f"http://{hp} @{decoy}/",
            f"https://{hp}/", f"http://{hp}/..;/", f"http://{decoy}/\\..\\@{hp}/"]


@pytest.fixture(scope="module")
def canary():
    """Servers on every loopback address (v4 and v6, one port) that no refused URL may ever reach."""
    v4 = RawServer(lambda path, body: [http("200 OK", {"Content-Type": "text/plain"}, b"secret")])
    servers = [v4]
    try:
        servers.append(RawServer(v4.script, host="::1", port=v4.port))
    except OSError:
        pass                     # no IPv6 loopback here: the v6 forms then reach nothing either way
    yield v4.port, servers
    for s in servers:
        s.close()


def test_the_guard_refuses_every_loopback_form_and_parser_trick(canary):
    port, servers = canary
    session = net.session(4, guard=net.public_only, trust_env=False)
    for host in LOOPBACK_HOSTS:
        for url in hostile_urls(host, port, decoy="93.184.216.34"):
            try:
                fetch_page(url, session=session, timeout=1.0, max_bytes=1000)
            except BrowseError:
                pass
            else:
                pytest.fail(f"{url!r} was fetched")
    assert sum(s.connections for s in servers) == 0


def test_redirects_to_any_loopback_form_are_refused_at_the_connection(canary):
    """A 'public' server (127.0.0.2, allowed by this test's guard) redirects to every hostile form of the canary."""
    port, servers = canary
    targets = [url for host in LOOPBACK_HOSTS for url in hostile_urls(host, port, decoy="127.0.0.2")]
    public = RawServer(lambda path, body: [http("302 Found", [("Location", targets[int(path.strip("/"))])], b"")],
                       host="127.0.0.2")
    session = net.session(4, guard=lambda ip: None if str(ip) == "127.0.0.2" else "not public", trust_env=False)
    for i in range(len(targets)):
        with pytest.raises(BrowseError):
            fetch_page(f"{public.url}/{i}", session=session, timeout=1.0, max_bytes=1000)
    assert sum(s.connections for s in servers) == 0 and len(public.hits) >= len(targets)
    public.close()


def test_urls_from_search_results_never_reach_a_local_address(canary):
    port, servers = canary
    urls = [url for host in LOOPBACK_HOSTS[:12] for url in hostile_urls(host, port, decoy="93.184.216.34")]
    docs = [Doc(id=str(i), title="t", text="x", url=u) for i, u in enumerate(urls)]

    class Results:
        name = "hostile"

        def search(self, queries, k):
            return [docs for _ in queries]
    tools = Tools(Results(), topk=len(docs), browse_timeout=1.0, browse_max_urls=len(urls))   # guard on: default
    seen = [set()]
    tools.run([ToolCall("web_search", {"query": "q"})], seen)
    [text] = tools.run([ToolCall("browse_webpage", {"url_list": urls, "query": "q"})], seen)
    assert tools.stats["tool_errors"] == 0 and "secret" not in text
    assert sum(s.connections for s in servers) == 0


def test_refusal_comes_before_connecting():
    with pytest.raises(BrowseRefused, match="private"):
        fetch_page("http://10.255.255.1/", session=net.session(1, guard=net.public_only), timeout=1.0, max_bytes=10)


# ----------------------------------------------------------------------------- secrets

@pytest.mark.parametrize("status", ["301 X", "302 X", "303 X", "307 X", "308 X"])
def test_api_calls_never_follow_redirects_so_keys_stay_home(monkeypatch, status):
    elsewhere = RawServer(lambda path, body: [http("200 OK", {"Content-Type": "application/json"}, b'{"organic": []}')])
    home = RawServer(lambda path, body: [http(status, {"Location": elsewhere.url + "/search"}, b"")])
    monkeypatch.setenv("SERPER_API_KEY", "serper-key-0123456789")
    with pytest.raises(SearchError, match="redirects are not followed"):
        SerperRetriever(endpoint=home.url, retries=0).search(["q"], 3)
    assert elsewhere.connections == 0
    home.close(), elsewhere.close()


@pytest.mark.parametrize("offset", [0, 150, 185, 190, 195, 199, 200, 210, 1990, 1995, 2000])
def test_a_key_echoed_anywhere_in_an_error_reply_is_redacted(offset):
    key = "sk-" + "abcdefghij" * 4

    def echo(path, body):
        return [http("401 Unauthorized", {"Content-Type": "text/plain"}, b"x" * offset + b"bad key " + key.encode())]
    server = RawServer(echo)
    session = net.session(1)
    session.headers["Authorization"] = f"Bearer {key}"
    with pytest.raises(net.RemoteError) as e:
        net.post_json(session, server.url, {}, what="judge", timeout=2.0, retries=0, backoff_s=0)
    message = str(e.value)
    assert not any(key[i:i + 6] in message for i in range(len(key) - 5)), message
    server.close()


# ----------------------------------------------------------------------------- length bounds

@pytest.mark.parametrize("text", ["a" * 10_000_000, "word " * 2_000_000, "\u4e2d" * 3_000_000, "x\n" * 5_000_000])
def test_tool_results_are_bounded_before_tokenization(text):
    class Huge:
        name = "huge"

        def search(self, queries, k):
            return [[Doc(id="1", title="t", text=text)] for _ in queries]

    class Tokenizer:            # records what it is asked to encode
        seen = []

        def encode(self, s, add_special_tokens=False):
            self.seen.append(len(s))
            return list(range(len(s.split())))

        def decode(self, ids):
            return "x " * len(ids)
    for tokenizer in (None, Tokenizer()):
        tools = Tools(Huge(), max_response_tokens=100, tokenizer=tokenizer)
        [out] = tools.run([ToolCall("web_search", {"query": "q"})], [set()])
        assert len(out) <= 8 * 100 + len(" ...[truncated]") and out.endswith("...[truncated]")
    assert max(Tokenizer.seen) <= 800


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_https_goes_through_the_same_guarded_connection(tmp_path):
    """A real TLS server (self-signed, so this session skips verification): the page is read through the guarded
    connection, and the guard refuses the same server by address."""
    import shutil
    import ssl
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-keyout", tmp_path / "key.pem", "-out", tmp_path / "cert.pem"], check=True, capture_output=True)

    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<p>tower height 330 metres</p>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/"
    session = net.session(1, trust_env=False)    # (an environment CA bundle would override verify=False)
    session.verify = False
    for _ in range(2):                  # the second request reuses the pooled TLS connection
        assert fetch_page(url, session=session, timeout=5.0, max_bytes=1000) == ["tower height 330 metres"]
    guarded = net.session(1, guard=net.public_only, trust_env=False)
    guarded.verify = False
    with pytest.raises(BrowseRefused):
        fetch_page(url, session=guarded, timeout=5.0, max_bytes=1000)
    server.shutdown()
