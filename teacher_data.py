"""Teacher data for SFT: a teacher LLM runs the real environment, and the trajectories that pass a filter are kept.

Atom-Searcher's SFT stage (arXiv 2508.12800, §3.2; METHOD.md §1.2) fine-tunes the policy on full multi-turn search
trajectories that a teacher wrote in the atomic-thought format. The paper names neither the teacher, nor its
prompt, nor the filter; this file is our version of that step:

1. The teacher plays the policy's part in `search_env.rollout`, so it sees exactly what the policy will see in
   training: the run's system prompt, tools, topk and limits (train.py's real run builds them the same way, through
   `tools.make_tools` and `atomic_thought.system_prompt`). Teachers, behind the engine interface:
   - `ChatTeacherEngine`: an OpenAI-compatible chat endpoint (e.g. `vllm serve Qwen/Qwen2.5-72B-Instruct`), told
     how to write atomic thoughts by `TEACHER_INSTRUCTIONS` (our prompt), called concurrently with a bounded pool;
   - `toy_world.ToyTeacherEngine`: the toy world's scripted, deliberately imperfect teacher (`--toy`, wired in
     run_setup.toy_teacher_setup).
2. The filter (`filter_trajectory`, our choice) sorts each question into one outcome: `kept` (well-formed, every
   think block holds an atom, F1 >= min_f1), `malformed` (format error, turn or context limit), `no_atoms`, `low_f1`,
   or `teacher_error` (the endpoint failed after its retries: never fatal, retried by the next run).
3. `TeacherDataFile` writes the result so that nothing is lost or torn: kept rows go to OUT (chat messages, the
   format `sft.load_examples` reads), rejected questions to OUT.rejected.jsonl with what was wrong and the teacher's
   last turn, the settings and counts to OUT.stats.json. A rerun with the same OUT skips finished questions.

Run (README "Real run", step 2):
    python teacher_data.py --teacher-url http://teacher:8002 --teacher-model Qwen/Qwen2.5-72B-Instruct \\
        --model Qwen/Qwen2.5-7B-Instruct --data train.jsonl --retriever http://retrieval:8000 --out sft.jsonl
    python teacher_data.py --toy --out data/sft.jsonl                       # the toy world's scripted teacher
The flags not shown default to train.py's real-run values (top-10 results, 10 turns, 2,000 tokens per turn, 32k
context capped by the model); a run with other values needs the same ones here (train.py refuses SFT data written
with another system prompt, or longer than its context). Our defaults: keep F1 >= 0.5 (0 for the toy teacher, whose
flaws must survive), teacher temperature 0.7. `--model` is the policy to be trained: only its tokenizer and chat
template are used, to render the episodes and hold them to the token limits. The API key, if the endpoint needs
one, is read from $OPENAI_API_KEY (or the variable named by --teacher-key-env) and is never printed, logged or saved.

Not covered: several teachers, reasoning-model teachers whose <think> differs from ours (they must follow the
instructions), and de-duplication of near-identical trajectories.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
from collections import Counter
from pathlib import Path

from atomic_thought import TAG_ROLES, THINK_PREFIX, render_messages
from engine import Completion, SamplingParams
from curriculum import f1_score
from net import ChatClient, RemoteError
from qa_data import MAX_QUESTION_CHARS, question_chars_arg
from run_setup import fail, toy_teacher_setup
from search_env import PAPER_LIMITS, rollout, sampled_runs

OUTCOMES = ("kept", "malformed", "no_atoms", "low_f1", "teacher_error")


# ----------------------------------------------------------------------------- teachers
TEACHER_INSTRUCTIONS = (
    "Write your reasoning inside <think> as a few short atomic thoughts, each in its own tag, in this order: "
    + ", ".join(f"<{tag}> {role} </{tag}>" for tag, role in TAG_ROLES.items())
    + ". Then make exactly one tool call or give the answer.")


class ChatTeacherEngine:
    """A teacher LLM behind an OpenAI-compatible chat endpoint, plugged into the rollout as an engine.

    The rollout hands it token ids; it splits the decoded ChatML text (`<|im_start|>role\\n...<|im_end|>`, the format
    of Qwen2.5 and of the toy tokenizer) back into messages, adds `TEACHER_INSTRUCTIONS` to the system message, and
    tokenizes the reply with the policy's tokenizer. At most `concurrency` requests are in flight; transient faults
    (connection, timeout, 429, 5xx) are retried `retries` times with backoff (net.post_json). A call that still
    fails, or a reply that is not a chat completion, becomes a Completion with `error` set: the rollout ends that
    episode as `engine_error`, and `filter_trajectory` counts it as a teacher error. The API key is read from
    $`api_key_env` at each call and kept nowhere.
    """

    def __init__(self, base_url: str, model: str, tokenizer, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout: float = 120.0, temperature: float = 0.7, concurrency: int = 16, retries: int = 2,
                 backoff_s: float = 1.0):
        self.client = ChatClient(base_url, model, what="teacher", api_key_env=api_key_env, timeout=timeout,
                                 retries=retries, backoff_s=backoff_s, pool_size=concurrency, max_bytes=64 << 20)
        self.tokenizer, self.temperature = tokenizer, temperature
        self.stats = Counter()   # calls, errors

    def _messages(self, ids: list[int]) -> list[dict]:
        text = self.tokenizer.decode(ids)
        messages = []
        for block in text.split("<|im_start|>")[1:]:
            role, _, content = block.partition("\n")
            messages.append({"role": role, "content": content.split("<|im_end|>")[0]})
        if messages and messages[-1]["role"] == "assistant":     # the open turn: its forced prefix only
            messages.pop()
        messages[0]["content"] += "\n" + TEACHER_INSTRUCTIONS
        return messages

    def _one(self, ids: list[int], params: SamplingParams) -> Completion:
        self.stats["calls"] += 1
        try:
            reply = self.client.chat(self._messages(ids), temperature=self.temperature,
                                     max_tokens=params.max_new_tokens, stop=list(params.stop))
        except RemoteError as e:
            self.stats["errors"] += 1
            return Completion([], [], "error", "", error=str(e))
        if reply.text is None:          # e.g. a reasoning teacher that spent max_tokens thinking: retried next run
            self.stats["errors"] += 1
            return Completion([], [], "error", "", error="teacher: the reply has no content")
        # OpenAI-style servers drop the stop string from the text: put back the one this turn ended with
        # (vLLM names it in `stop_reason`; elsewhere the open tag tells).
        text, stop = reply.text, reply.stop_reason
        if isinstance(stop, str) and stop in params.stop and not text.rstrip().endswith(stop):
            text += stop
        elif "<tool_call>" in text and "</tool_call>" not in text:
            text += "</tool_call>"
        elif "<answer>" in text and "</answer>" not in text:
            text += "</answer>"
        text = text.removeprefix(THINK_PREFIX).removeprefix("<think>")
        turn_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        # a turn cut by the server's max_tokens, or longer than the policy may write, is too long (as the policy's)
        too_long = reply.finish_reason == "length" or len(turn_ids) > params.max_new_tokens
        turn_ids = turn_ids[:params.max_new_tokens]
        return Completion(turn_ids, [0.0] * len(turn_ids), "length" if too_long else "stop",
                          self.tokenizer.decode(turn_ids, skip_special_tokens=True))

    def generate(self, prompt_ids_list, params) -> list[Completion]:
        return self.client.map(lambda ids: self._one(ids, params), prompt_ids_list)


# ----------------------------------------------------------------------------- the filter
def filter_trajectory(t, question: dict, *, system: str, tokenizer, min_f1: float) -> tuple[str, dict]:
    """(outcome, record): the SFT row of a kept trajectory, else what was wrong with it (choice 2 above)."""
    if t.finish == "answer" and all(turn.atoms for turn in t.turns):
        f1 = f1_score(t.answer, t.golden_answers)
        if f1 >= min_f1:
            return "kept", {"id": question.get("id"), "benchmark": question.get("benchmark"), "question": t.question,
                            "golden_answers": t.golden_answers, "f1": f1, "metadata": t.metadata,
                            "messages": render_messages(system, t.question, t.turns, t.tool_responses)}
        outcome, detail = "low_f1", f"F1 {f1:.2f} < {min_f1} (answer {t.answer!r})"
    elif t.finish == "answer":
        outcome, detail = "no_atoms", "a think block without atomic thoughts"
    elif t.finish == "engine_error":
        outcome, detail = "teacher_error", t.format_error
    else:
        outcome, detail = "malformed", t.format_error or t.finish
    runs = sampled_runs(t.ids, t.mask)
    return outcome, {"id": question.get("id"), "benchmark": question.get("benchmark"), "question": t.question,
                     "outcome": outcome, "detail": detail, "last_turn": tokenizer.decode(runs[-1]) if runs else None}


def teacher_batches(teacher, tools, questions: list[dict], *, tokenizer, params, system: str,
                    tool_names: tuple[str, ...], min_f1: float = 0.0, max_turns: int = 10, max_context: int = 32768,
                    batch_size: int = 64):
    """Run the teacher in the real environment, a batch of questions at a time; yield, per batch, a list of
    (question, outcome, record) in question order."""
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        trajs = rollout(teacher, tools, batch, tokenizer=tokenizer, params=params, max_turns=max_turns,
                        max_context=max_context, system=system, tool_names=tool_names)
        yield [(q, *filter_trajectory(t, q, system=system, tokenizer=tokenizer, min_f1=min_f1))
               for q, t in zip(batch, trajs)]


def make_teacher_data(teacher, tools, questions: list[dict], **kwargs) -> tuple[list[dict], dict]:
    """All of `teacher_batches` in memory -> (kept rows, counts of every outcome and of questions generated)."""
    rows, counts = [], Counter({key: 0 for key in ("generated",) + OUTCOMES})
    for batch in teacher_batches(teacher, tools, questions, **kwargs):
        for _, outcome, record in batch:
            counts["generated"] += 1
            counts[outcome] += 1
            if outcome == "kept":
                rows.append(record)
    return rows, dict(counts)


# ----------------------------------------------------------------------------- the output files
def read_rows(path: Path) -> list[dict]:
    """The JSON rows of a jsonl file this module wrote. A torn last line (a run killed mid-write) is cut off
    the file; any other unreadable line is an error naming the file and line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        print(f"warning: {path}: cut off a torn last line ({len(data) - keep} bytes, from a killed run)",
              file=sys.stderr)
        os.truncate(path, keep)
        data = data[:keep]
    rows = []
    for n, line in enumerate(data.splitlines(), 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("id"), str):
                raise ValueError("not a JSON object with a string 'id'")
        except ValueError as e:
            raise ValueError(f"{path}:{n}: unreadable row ({e}); move the file away to start afresh") from None
        rows.append(row)
    return rows


def question_key(row: dict) -> str:
    """What names a question across runs: its benchmark and id (FlashRAG ids such as "train_0" repeat across
    benchmarks, so a mix of them needs both)."""
    return f"{row.get('benchmark') or ''}/{row['id']}"


def append_line(fd: int, record: dict) -> None:
    """One record as one line, written to the end of the file in as few `write` calls as the kernel allows."""
    data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode())
    while data:
        data = data[os.write(fd, data):]


class TeacherDataFile:
    """OUT (kept rows), OUT.rejected.jsonl (rejected questions) and OUT.stats.json (settings, counts), resumable.

    Every record is one line written to a file opened for appending (`append_line`), and the files are fsynced after
    every batch, so a killed run loses at most the batch in flight (and `read_rows` cuts a torn line). A question
    (`question_key`) is finished once kept or rejected; a teacher error is not final and is retried. A lock file
    keeps two runs from writing the same OUT; OUT must be rerun with the settings it was made with.
    """

    def __init__(self, path: str | os.PathLike, settings: dict):
        self.path = Path(path)
        self.rejected_path, self.stats_path = (self.path.with_name(self.path.name + s)
                                               for s in (".rejected.jsonl", ".stats.json"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path.with_name(self.path.name + ".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another teacher_data.py run is writing {self.path}") from None
        if self.stats_path.exists():
            old = json.loads(self.stats_path.read_text()).get("settings", {})
            changed = sorted(k for k in settings if k in old and old[k] != settings[k])
            if changed:
                raise ValueError(f"{self.path} was made with other settings ({', '.join(changed)}): rerun with the "
                                 "same flags, or write to another --out")
        self.settings = settings
        self.status: dict[str, str] = {}          # question_key -> its latest outcome
        for row in read_rows(self.rejected_path):
            self.status[question_key(row)] = row["outcome"]
        for row in read_rows(self.path):
            self.status[question_key(row)] = "kept"
        self.this_run = Counter()

    def finished(self, question: dict) -> bool:
        return self.status.get(question_key(question), "teacher_error") != "teacher_error"

    def add(self, batch: list[tuple[dict, str, dict]]) -> None:
        """Append a batch of (question, outcome, record), then make it durable."""
        with open(self.path, "ab") as kept, open(self.rejected_path, "ab") as rejected:
            for question, outcome, record in batch:
                append_line((kept if outcome == "kept" else rejected).fileno(), record)
                self.status[question_key(question)] = outcome
                self.this_run[outcome] += 1
            for f in (kept, rejected):
                os.fsync(f.fileno())
        self.write_stats()

    def counts(self) -> dict:
        return {k: sum(v == k for v in self.status.values()) for k in OUTCOMES}

    def write_stats(self) -> None:
        tmp = self.stats_path.with_name(self.stats_path.name + ".tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "counts": self.counts(),
                                   "last_run": dict(self.this_run)}, indent=1))
        os.replace(tmp, self.stats_path)


# ----------------------------------------------------------------------------- the command
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="SFT jsonl to write or continue (rejects and stats beside it)")
    # the real run's teacher and environment
    p.add_argument("--teacher-url", help="OpenAI-compatible endpoint of the teacher LLM")
    p.add_argument("--teacher-model", help="the teacher's model name at --teacher-url")
    p.add_argument("--teacher-key-env", default="OPENAI_API_KEY", help="environment variable holding its API key")
    p.add_argument("--model", help="the policy to be trained (its tokenizer and chat template only)")
    p.add_argument("--data", help="questions: jsonl path(s) or a hub mix (qa_data.py), e.g. train.jsonl")
    p.add_argument("--limit", type=int, help="questions to draw from --data (default: all)")
    p.add_argument("--max-question-chars", type=question_chars_arg, default=MAX_QUESTION_CHARS,
                   help="a longer question or golden answer is a bad row, reported and skipped, never tokenized "
                        f"(default {MAX_QUESTION_CHARS})")
    p.add_argument("--retriever", help="bm25:CORPUS | http(s)://retrieval-server | serper, as train.py's")
    p.add_argument("--query-cache", help="sqlite file caching search results, as train.py's")
    p.add_argument("--reader-url", help="page reader for browse_webpage (serper), as train.py's")
    p.add_argument("--reader-model", help="the page reader's model name")
    p.add_argument("--topk", type=int, default=10, help="results per search (train.py --topk; paper: 10)")
    p.add_argument("--max-turns", type=int, default=PAPER_LIMITS["max_turns"], help="turns per episode")
    p.add_argument("--max-new-tokens", type=int, default=PAPER_LIMITS["max_new_tokens"], help="policy tokens per turn")
    p.add_argument("--max-context", type=int, help="policy tokens per episode (default: 32768, capped by --model)")
    p.add_argument("--min-f1", type=float, help="keep trajectories with F1 >= this (default 0.5; --toy: 0)")
    p.add_argument("--temperature", type=float, default=0.7, help="the teacher's sampling temperature")
    p.add_argument("--concurrency", type=int, default=16, help="teacher requests in flight at most")
    p.add_argument("--batch-size", type=int, default=64, help="questions per rollout batch (written after each)")
    p.add_argument("--teacher-retries", type=int, default=2, help="retries of a failed teacher call")
    p.add_argument("--teacher-timeout", type=float, default=120.0, help="seconds to connect / between bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit draw")
    # the toy world's scripted teacher
    p.add_argument("--toy", action="store_true", help="the toy world's scripted teacher instead of an LLM")
    p.add_argument("--world-seed", type=int, default=0, help="--toy: world seed")
    p.add_argument("--real-prompt", action="store_true",
                   help="--toy: under a real run's system prompt (rows for train.py --model on a toy-world model)")
    p.add_argument("--n", type=int, help="--toy: train questions to run the teacher on (default: the demo's)")
    p.add_argument("--premature-rate", type=float, help="--toy: teacher flaw, answer one hop early")
    p.add_argument("--wrong-search-rate", type=float, help="--toy: teacher flaw, misspelt first search")
    return p.parse_args(argv)


def real_setup(args) -> dict:
    """The real run's teacher, policy tokenizer, tools, system prompt and limits, checked as train.py checks them
    (run_setup.py), each failure naming its flag."""
    from atomic_thought import system_prompt
    from qa_data import load_questions
    from run_setup import check_endpoint, check_reader, checked_tokenizer, probed_tools, prompt_fit
    from tools import tool_names_of
    for flag in ("--teacher-url", "--teacher-model", "--model", "--data"):
        if not getattr(args, flag[2:].replace("-", "_")):
            fail(flag, "required without --toy")
    tokenizer, max_context = checked_tokenizer(args.model, args.max_context)
    try:
        questions = load_questions(args.data, limit=args.limit, seed=args.seed,
                                   max_question_chars=args.max_question_chars,
                                   check=prompt_fit(tokenizer, args.retriever, max_context))
    except (OSError, ValueError) as e:
        fail("--data", str(e))
    check_reader(args.reader_url, args.reader_model, tool_names_of(args.retriever))
    tools, tool_names = probed_tools(args.retriever, tokenizer=tokenizer, topk=args.topk, query_cache=args.query_cache,
                                     reader_url=args.reader_url, reader_model=args.reader_model)
    check_endpoint(args.teacher_url, args.teacher_model, "--teacher-url", "--teacher-model", args.teacher_key_env)
    teacher = ChatTeacherEngine(args.teacher_url, args.teacher_model, tokenizer, api_key_env=args.teacher_key_env,
                                timeout=args.teacher_timeout, temperature=args.temperature,
                                concurrency=args.concurrency, retries=args.teacher_retries)
    return dict(teacher=teacher, tokenizer=tokenizer, tools=tools, tool_names=tool_names, questions=questions,
                system=system_prompt(tool_names), max_turns=args.max_turns, max_new_tokens=args.max_new_tokens,
                max_context=max_context, min_f1=0.5 if args.min_f1 is None else args.min_f1)


def main(argv: list[str] | None = None) -> dict:
    """`python teacher_data.py ...`: write (or continue) OUT; returns the counts of OUT."""
    from tqdm import tqdm
    args = parse_args(argv)
    env = toy_teacher_setup(args) if args.toy else real_setup(args)
    settings = {"teacher": "toy" if args.toy else args.teacher_model, "temperature": args.temperature,
                "system": env["system"], "topk": env["tools"].topk, "min_f1": env["min_f1"],
                **{k: env[k] for k in ("max_turns", "max_new_tokens", "max_context")}}
    try:
        out = TeacherDataFile(args.out, settings)
    except ValueError as e:
        fail("--out", str(e))
    todo = [q for q in env["questions"] if not out.finished(q)]
    print(f"{len(env['questions']) - len(todo)} of {len(env['questions'])} questions already finished in {args.out}; "
          f"running the teacher on {len(todo)}", flush=True)
    params = SamplingParams(max_new_tokens=env["max_new_tokens"])
    bar = tqdm(total=len(todo), desc="teacher", unit="question", disable=None)
    for batch in teacher_batches(env["teacher"], env["tools"], todo, tokenizer=env["tokenizer"], params=params,
                                 system=env["system"], tool_names=env["tool_names"], min_f1=env["min_f1"],
                                 max_turns=env["max_turns"], max_context=env["max_context"],
                                 batch_size=args.batch_size):
        out.add(batch)
        bar.update(len(batch))
        bar.set_postfix({k: v for k, v in out.this_run.items()})
    bar.close()
    out.write_stats()
    counts = out.counts()
    print(f"this run: {dict(out.this_run)}; {args.out} now: {counts} (stats in {out.stats_path}, rejects in "
          f"{out.rejected_path}); search: {dict(env['tools'].stats)}", flush=True)
    if counts["teacher_error"]:
        print(f"warning: {counts['teacher_error']} questions failed at the teacher; run the same command again to "
              "retry them", file=sys.stderr)
    return counts


if __name__ == "__main__":
    main()
