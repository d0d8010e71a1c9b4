"""A scripted teacher behind a real OpenAI-compatible HTTP API, for the real-run tests (`teacher_data.py`).

A tiny local model cannot write useful trajectories, so this server stands in for the teacher LLM: it speaks the
same API a vLLM server does (GET /v1/models, POST /v1/chat/completions, stop strings dropped from the reply and
named in `stop_reason`), reads the conversation it is sent, and writes atomic-thought turns with
atomic_thought.render_turn: first a search for the question, then an answer. Like a strong LLM that knows the
answer, it answers with the question's first golden answer (read from --questions), and says whether the search
results named it. Faults on purpose, to exercise the filter and the resume path:
  --garbage-every K   every K-th question (by its line in --questions) gets a reply without the format;
  --fail-every M      every M-th question's first --fail-times requests get HTTP 500 (a teacher that is down);
  --delay S           every reply waits S seconds (a slow teacher, to kill a run mid-way).
Run: python tests/scripted_teacher.py --questions a.jsonl,b.jsonl [--port 0]  (prints the URL it serves on).
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atomic_thought import Atom, ToolCall, make_turn, render_turn  # noqa: E402


def teacher_text(question: str, golden: str, responses: list[str]) -> str:
    """The assistant text of the next turn, after `responses` (the tool responses so far). The thoughts are short
    and never repeat the answer, so a tiny model learns the format in a hundred steps: with "The answer is X." in
    a thought, it went on after `<answer> X` with that thought's closing tag."""
    if not responses:
        return render_turn(make_turn([
            Atom("OBSERVATION", "A question to research."), Atom("HYPOTHESIS_TESTING", "Unknown until searched."),
            Atom("RISK_ANALYSIS", "Results may be off topic."), Atom("ACTION", "Search.")],
            tool_call=ToolCall("web_search", {"query": question})))
    named = golden.lower() in responses[-1].lower()
    return render_turn(make_turn([
        Atom("OBSERVATION", "The results name the answer." if named else "The results do not name it."),
        Atom("HYPOTHESIS_TESTING", "It is known now." if named else "It is known from memory."),
        Atom("RISK_ANALYSIS", "It may be incomplete."), Atom("ACTION", "Answer.")], answer=golden))


def make_server(questions: dict[str, tuple[int, str]], *, model: str, port: int = 0, garbage_every: int = 0,
                fail_every: int = 0, fail_times: int = 0, delay_s: float = 0.0) -> ThreadingHTTPServer:
    """`questions`: question text -> (its index, its first golden answer)."""
    requests_of = Counter()          # question -> requests so far
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/v1/models":
                return self._reply(200, {"object": "list", "data": [{"id": model, "object": "model"}]})
            self._reply(404, {"error": f"unknown path {self.path}"})

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self._reply(404, {"error": f"unknown path {self.path}"})
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("model") != model:
                return self._reply(404, {"error": f"model {body.get('model')!r} does not exist"})
            messages = body["messages"]
            question = messages[1]["content"]
            if question not in questions:
                return self._reply(400, {"error": "unknown question"})
            index, golden = questions[question]
            with lock:
                requests_of[question] += 1
                n = requests_of[question]
            time.sleep(delay_s)
            if fail_every and index % fail_every == 0 and n <= fail_times:
                return self._reply(500, {"error": "scripted outage"})
            if garbage_every and index % garbage_every == 0:
                text = f"I believe the answer is {golden}, no need to search."
            else:
                responses = [m["content"] for m in messages[2:] if m["content"].startswith("<tool_response>")]
                text = teacher_text(question, golden, responses)
            stop = next((s for s in body.get("stop", []) if s in text), None)
            if stop:                  # as OpenAI-style servers do: the text ends before the stop string
                text = text[:text.index(stop)]
            self._reply(200, {"object": "chat.completion", "model": model, "choices": [{
                "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                "stop_reason": stop}]})

        def log_message(self, format, *args):
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def load(paths: list[str]) -> dict[str, tuple[int, str]]:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    return {r["question"]: (i, r["golden_answers"][0]) for i, r in enumerate(rows)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", required=True, help="comma-separated FlashRAG jsonl files")
    p.add_argument("--model", default="scripted-teacher", help="the model name it serves")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: any free one)")
    p.add_argument("--garbage-every", type=int, default=0)
    p.add_argument("--fail-every", type=int, default=0)
    p.add_argument("--fail-times", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args()
    server = make_server(load(a.questions.split(",")), model=a.model, port=a.port, garbage_every=a.garbage_every,
                         fail_every=a.fail_every, fail_times=a.fail_times, delay_s=a.delay)
    print(f"serving http://127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
