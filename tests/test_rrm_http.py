"""HTTPJudgeRRM against a local scripted OpenAI-compatible server (ThreadingHTTPServer on 127.0.0.1).

Each request is answered by the next action scripted for its question (the server reads the question
from the prompt's data block, so concurrent requests are scripted independently): good, garbage,
500, slow (longer than the client timeout), echo_auth (500 whose body echoes the Authorization header),
not_json (200 with a non-JSON body), null_content, hold (good after a pause, to observe concurrency).
"""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import rrm_reward
from rrm_reward import ATR, HTTPJudgeRRM
from test_rrm_reward import read_prompt, scripted_reply, traj

SECRET = "sk-test-SECRET-4242"


class ScriptedJudge(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.seen, self.lock = {}, [], threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def handle_error(self, request, client_address):
        pass   # a client that timed out closes its socket; the late write fails by design

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, status, body):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        question = read_prompt(body["messages"])[1]["question"]
        with srv.lock:
            srv.seen.append((self.path, question, self.headers.get("Authorization"), body))
            actions = srv.script.get(question, [])
            action = actions.pop(0) if actions else "good"
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
        try:
            if action in ("slow", "hold"):
                time.sleep(2.0 if action == "slow" else 0.15)
            if action == "500":
                return self._send(500, {"error": "overloaded"})
            if action == "echo_auth":
                return self._send(500, f"bad key {self.headers.get('Authorization')}")
            if action == "not_json":
                return self._send(200, "<html>gateway error</html>")
            content = None if action == "null_content" else scripted_reply(
                body["messages"], "garbage" if action == "garbage" else "good")
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": content},
                                          "finish_reason": "stop"}]})
        finally:
            with srv.lock:
                srv.in_flight -= 1


@pytest.fixture
def server():
    srv = ScriptedJudge()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def judge(server, **kwargs):
    kwargs = {"retry_backoff_s": 0.0, "timeout_s": 5.0, "api_key_env": "RRM_TEST_KEY", **kwargs}
    return HTTPJudgeRRM(server.url, "judge-model", **kwargs)


def test_batch_of_good_replies_gives_exact_atrs(server):
    batch = [traj([("OBSERVATION", f"{k} x"), ("ACTION", "10 y")], [("RISK_ANALYSIS", "4 z")], question=f"q{k}")
             for k in range(6)]
    rrm = judge(server, temperature=0.3, max_tokens=77)
    out = rrm.score(batch)
    rrm.close()
    assert [a.value for a in out] == pytest.approx([(k + 14) / 30 for k in range(6)])   # mean(k, 10, 4) / 10
    assert out[2] == ATR(pytest.approx(16 / 30), (2.0, 10.0, 4.0), ("scripted",) * 3)
    assert sorted(q for _, q, _, _ in server.seen) == [f"q{k}" for k in range(6)]
    path, _, _, body = server.seen[0]
    assert path == "/v1/chat/completions"
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("judge-model", 0.3, 77)
    assert rrm.stats == {"calls": 6}


def test_faults_are_retried_then_fall_back(server):
    server.script = {"garbage_once": ["garbage"], "always_garbage": ["garbage"] * 3, "http500": ["500"],
                     "slow": ["slow"], "not_json": ["not_json"], "null": ["null_content"] * 3}
    names = ["garbage_once", "always_garbage", "http500", "slow", "not_json", "null", "fine"]
    batch = [traj([("OBSERVATION", "6 a"), ("ACTION", "8 b")], question=q) for q in names]
    rrm = judge(server, timeout_s=0.5, max_retries=2, fallback_atr=0.1)
    out = dict(zip(names, rrm.score(batch)))
    for q in ("garbage_once", "http500", "slow", "not_json", "fine"):
        assert out[q] == ATR(pytest.approx(0.7), (6.0, 8.0), ("scripted", "scripted")), q
    for q in ("always_garbage", "null"):
        assert out[q].value == 0.1 and out[q].fallback and out[q].scores is None
    assert "no complete JSON object" in out["always_garbage"].error
    assert rrm.stats == {"calls": 7 + 6 + 2, "retries": 8, "parse_errors": 1 + 3 + 3, "http_errors": 3,
                         "fallbacks": 2}
    rrm.close()


def test_transport_failures_back_off_exponentially(server, monkeypatch):
    server.script = {"q": ["500", "500", "500"]}
    sleeps = []
    monkeypatch.setattr(rrm_reward.time, "sleep", sleeps.append)
    rrm = judge(server, retry_backoff_s=0.5, max_retries=2)
    [atr] = rrm.score([traj([("A", "3 x")], question="q")])
    assert sleeps == [0.5, 1.0]
    assert atr.fallback and "judge call failed: judge: HTTP 500" in atr.error
    assert rrm.stats["http_errors"] == 3 and rrm.stats["fallbacks"] == 1


def test_parse_errors_retry_without_waiting(server, monkeypatch):
    server.script = {"q": ["garbage"]}
    sleeps = []
    monkeypatch.setattr(rrm_reward.time, "sleep", sleeps.append)
    [atr] = judge(server, retry_backoff_s=0.5).score([traj([("A", "3 x")], question="q")])
    assert atr.value == pytest.approx(0.3) and sleeps == []


def test_malformed_trajectories_never_reach_the_server(server):
    batch = [traj([("A", "9 x")], finish="format_error", question="bad1"),
             traj([("A", "9 x")], finish="max_turns", question="bad2"),
             traj([], question="no_atoms"),
             traj([("A", "9 x")], question="ok")]
    rrm = judge(server)
    out = rrm.score(batch)
    assert [q for _, q, _, _ in server.seen] == ["ok"]
    assert [a.value for a in out] == [None, None, 0.0, pytest.approx(0.9)]
    assert rrm.stats == {"calls": 1, "format_skipped": 2, "zero_atoms": 1}
    assert judge(server).score([batch[0]])[0].value is None and len(server.seen) == 1


def test_concurrency_is_bounded_by_the_pool(server):
    server.script = {f"q{k}": ["hold"] for k in range(12)}
    batch = [traj([("A", "5 x")], question=f"q{k}") for k in range(12)]
    out = judge(server, concurrency=4).score(batch)
    assert all(a.value == pytest.approx(0.5) for a in out)
    assert 2 <= server.max_in_flight <= 4        # requests overlap, and never more than the pool allows


def test_api_key_comes_from_env_and_never_leaks(server, monkeypatch):
    monkeypatch.setenv("RRM_TEST_KEY", SECRET)
    server.script = {"q": ["echo_auth"] * 2}
    rrm = judge(server, max_retries=1)
    [atr] = rrm.score([traj([("A", "3 x")], question="q")])
    assert server.seen[0][2] == f"Bearer {SECRET}"                    # sent to the server ...
    assert atr.fallback and "bad key Bearer ***" in atr.error          # ... but redacted from errors
    for text in (atr.error, repr(rrm), str(rrm.stats), str(vars(rrm))):
        assert SECRET not in text
    assert "key from $RRM_TEST_KEY: set" in repr(rrm)


def test_no_key_in_env_sends_no_auth_header(server, monkeypatch):
    monkeypatch.delenv("RRM_TEST_KEY", raising=False)
    rrm = judge(server)
    [atr] = rrm.score([traj([("A", "3 x")], question="q")])
    assert atr.value == pytest.approx(0.3) and server.seen[0][2] is None
    assert "unset" in repr(rrm)


def test_unreachable_server_falls_back_without_raising():
    probe = ScriptedJudge()
    url = probe.url
    probe.server_close()                       # nothing listens on this port any more
    rrm = HTTPJudgeRRM(url, "m", retry_backoff_s=0.0, max_retries=1, timeout_s=2.0)
    [atr] = rrm.score([traj([("A", "3 x")])])
    assert atr.fallback and atr.value == 0.0 and "connection failed" in atr.error
    assert rrm.stats == {"calls": 2, "retries": 1, "http_errors": 2, "fallbacks": 1}


@pytest.mark.parametrize("base_url", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1/",
                                      "http://127.0.0.1:8000/v1/chat/completions"])
def test_every_chat_caller_uses_the_one_client_and_its_url_form(base_url):
    """The RRM judge, the answer judge, the teacher and the page reader all talk through net.ChatClient."""
    from evaluate import AnswerJudge
    from net import ChatClient
    from teacher_data import ChatTeacherEngine
    from tools import Tools
    clients = [HTTPJudgeRRM(base_url, "m").client, AnswerJudge(base_url, "m").client,
               ChatTeacherEngine(base_url, "m", tokenizer=None).client,
               Tools(None, reader_url=base_url, reader_model="m").reader]
    assert all(isinstance(c, ChatClient) for c in clients)
    assert {c.base for c in clients} == {"http://127.0.0.1:8000/v1"}
    assert [c.what for c in clients] == ["judge", "answer judge", "teacher", "reader"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(base_url="127.0.0.1:8000"), "judge URL must start with http:// or https://"),
    (dict(base_url="http://x", concurrency=0), "judge: need timeout > 0, retries >= 0, pool_size >= 1"),
    (dict(base_url="http://x", timeout_s=0), "judge: need timeout > 0, retries >= 0, pool_size >= 1"),
    (dict(base_url="http://x", max_tokens=0), "max_tokens must be positive"),
])
def test_bad_http_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HTTPJudgeRRM(model="m", **kwargs)
