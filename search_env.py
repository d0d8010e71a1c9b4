"""The search environment: the multi-turn episode loop that records the agent's tokens and makes the loss mask.

METHOD.md §2, §7: each assistant turn is `<think>` with atomic thoughts, then one action; a tool call (tools.py)
comes back as a `tool` chat turn (`<tool_response>...</tool_response>`), and the episode goes on until an `<answer>`.

The episode loop (`rollout`) is token-in/token-out (METHOD.md §7): the engine's sampled ids are appended with
mask 1, each tool response is rendered through the chat template as a `tool` turn, tokenized on its own and
appended with mask 0, and generated text is never re-tokenized, so `decode(prompt_ids + ids)` is exactly the
chat-template rendering of the conversation and the loss trains only on tokens the policy sampled. This is the
one place a mask is made: `render_conversation` lays out SFT's teacher conversations from the same pieces
(`prompt_ids`, `TurnGlue`), and grpo.py consumes `Trajectory.mask`. `show_mask` prints the two kinds of token in
different colours.

Not covered: asynchronous rollouts (every turn waits for the slowest trajectory of the batch, as in DeepResearcher).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from atomic_thought import ALL_TOOLS, THINK_PREFIX, FormatError, Turn, parse_turn, system_prompt


@dataclass
class Trajectory:
    """One episode: the one data structure that crosses files (METHOD.md §7).

    `ids` holds every token after the prompt, in order; `mask` has the same length and is
    1 exactly where the policy sampled the token (trained on), 0 for tool responses, template glue
    and padding. `logprobs` are the sampler's log-probs of those tokens (0.0 where mask is 0).
    """
    question: str
    golden_answers: list[str]
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)        # parsed assistant turns, in order
    tool_responses: list[str] = field(default_factory=list)  # the text returned for each tool call
    answer: str | None = None                               # the final <answer>, None if never given
    n_tool_calls: int = 0
    finish: str = ""                            # answer | max_turns | length | format_error | engine_error
    format_error: str | None = None             # what was wrong when finish is format_error or engine_error
    text: str = ""                                          # decode(prompt_ids + ids), for viewing
    metadata: dict = field(default_factory=dict)            # the question's metadata (e.g. toy gold chain)

    @property
    def format_ok(self) -> bool:
        """Well-formed and answered: the precondition for F1 and ATR (METHOD.md §3.1, format reward)."""
        return self.finish == "answer"


# ----------------------------------------------------------------------------- the episode loop
# The episode limits of the paper's run (METHOD.md §4, DeepResearcher's): teacher data, training and evaluation
# default to these, so the three see the same episodes (the toy world has its own, toy_world.LIMITS).
PAPER_LIMITS = dict(max_turns=10, max_new_tokens=2000, max_context=32768)


def prompt_ids(tokenizer, question: str, system: str) -> list[int]:
    """System + user turn + the assistant header, then the forced `<think>` prefix (METHOD.md §2)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    return list(ids) + tokenizer(THINK_PREFIX, add_special_tokens=False)["input_ids"]


class TurnGlue:
    """The template text injected between assistant turns, read off the tokenizer's own chat template.

    Rendering [.., assistant "A"] and [.., assistant "A", tool "R"] (+ generation prompt) and diffing
    them gives exactly the text the template puts after an assistant turn and around a tool response
    (the TRL `_get_tool_suffix_ids` idea). It is tokenized on its own and appended with mask 0; the
    sampled ids are never re-tokenized, so decode(prompt_ids + ids) equals the rendered conversation.
    """
    SENTINEL_A, SENTINEL_R = "\x00ASSISTANT\x00", "\x00RESPONSE\x00"

    def __init__(self, tokenizer):
        base = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": self.SENTINEL_A}]
        closed = tokenizer.apply_chat_template(base, tokenize=False)
        full = tokenizer.apply_chat_template(base + [{"role": "tool", "content": self.SENTINEL_R}],
                                             tokenize=False, add_generation_prompt=True)
        if not full.startswith(closed) or self.SENTINEL_R not in full:
            raise ValueError("chat template does not render a tool turn after an assistant turn as a suffix")
        self.close = closed[closed.index(self.SENTINEL_A) + len(self.SENTINEL_A):]    # e.g. "<|im_end|>\n"
        before, after = full[len(closed):].split(self.SENTINEL_R)
        self.before_response, self.after_response = before, after + THINK_PREFIX
        self.tokenizer = tokenizer

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def close_ids(self, ended_with_eos: bool) -> list[int]:
        """After the final turn; an EOS the model sampled already closed the turn."""
        eos = self.tokenizer.eos_token or ""
        close = self.close[len(eos):] if ended_with_eos and eos and self.close.startswith(eos) else self.close
        return self.ids(close)

    def tool_ids(self, response: str) -> list[int]:
        """Close the assistant turn, the tool turn holding `response`, and the next turn's forced prefix."""
        return self.ids(self.close + self.before_response + response + self.after_response)


def rollout(engine, tools, questions: list[dict], *, tokenizer, params, group_size: int = 1,
            max_turns: int = 10, max_context: int = 32768, system: str | None = None,
            tool_names: tuple[str, ...] = ALL_TOOLS) -> list[Trajectory]:
    """Run `group_size` episodes per question, all turns batched, and return their `Trajectory`s.

    Each turn: every unfinished trajectory is generated in one engine call; its sampled ids are appended
    with mask 1; the turn is parsed with `parse_turn`; the tool calls of the batch run together; each
    response is appended as template glue with mask 0. An episode ends with an answer, a format error,
    the turn limit, the context limit, or an engine that could not generate (`finish`). Trajectories of
    one question are adjacent, as GRPO's groups expect.
    """
    system = system_prompt(tool_names) if system is None else system
    glue = TurnGlue(tokenizer)
    vocab = len(tokenizer)
    trajs = []
    for q in questions:
        p_ids = prompt_ids(tokenizer, q["question"], system)
        trajs += [Trajectory(q["question"], list(q["golden_answers"]), p_ids, metadata=q.get("metadata", {}))
                  for _ in range(group_size)]
    seen_urls = [set() for _ in trajs]          # browse_webpage may only open what search showed
    active = list(range(len(trajs)))

    def extend(t: Trajectory, ids: list[int], trained: bool, logprobs: list[float] | None = None) -> None:
        t.ids += ids                                    # the only two places tokens enter a trajectory:
        t.mask += [1 if trained else 0] * len(ids)      # sampled -> mask 1, injected -> mask 0
        t.logprobs += logprobs if trained else [0.0] * len(ids)

    for _ in range(max_turns):
        for i in active:                # a prompt that fills the context has no room for a token (vLLM refuses it)
            if len(trajs[i].prompt_ids) + len(trajs[i].ids) >= max_context:
                trajs[i].finish = "length"
        active = [i for i in active if not trajs[i].finish]
        if not active:
            break
        completions = engine.generate([trajs[i].prompt_ids + trajs[i].ids for i in active], params)
        calls, callers = [], []
        for i, c in zip(active, completions):
            t = trajs[i]
            if c.error is not None:             # the engine produced no turn (a remote teacher failed)
                t.finish, t.format_error = "engine_error", c.error
                continue
            room = max_context - len(t.prompt_ids) - len(t.ids)
            extend(t, c.token_ids[:room], True, c.logprobs[:room])
            if len(c.token_ids) > room or c.finish_reason == "length":
                t.finish = "length"
                continue
            if any(tok >= vocab for tok in c.token_ids):   # Qwen's padded embedding rows (METHOD.md §7)
                t.finish, t.format_error = "format_error", "sampled a token id outside the tokenizer's vocabulary"
                continue
            try:
                turn = parse_turn(THINK_PREFIX + c.text, tools=tool_names)
            except FormatError as e:
                t.finish, t.format_error = "format_error", str(e)
                continue
            t.turns.append(turn)
            if turn.answer is not None:
                t.answer, t.finish = turn.answer, "answer"
                extend(t, glue.close_ids(c.finish_reason == "eos"), False)
            else:
                calls.append(turn.tool_call)
                callers.append(i)
        responses = tools.run(calls, [seen_urls[i] for i in callers]) if calls else []
        for i, response in zip(callers, responses):
            t = trajs[i]
            t.n_tool_calls += 1
            t.tool_responses.append(response)
            injected = glue.tool_ids(response)
            if len(t.prompt_ids) + len(t.ids) + len(injected) >= max_context:   # no room left to sample a token
                t.finish = "length"
                continue
            extend(t, injected, False)
        active = [i for i in active if not trajs[i].finish]
    for i in active:
        trajs[i].finish = "max_turns"
    for t in trajs:
        t.text = tokenizer.decode(t.prompt_ids + t.ids)
    return trajs


def render_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, ids, mask) of a conversation [system, user, assistant, tool, assistant, ...].

    Built from the same pieces as the rollout (prompt_ids, TurnGlue), so the ids equal what a rollout that
    sampled these assistant texts would hold, and mask = 1 exactly on the assistant's text after `<think>\\n`.
    """
    roles = [m["role"] for m in messages]
    if roles[:2] != ["system", "user"] or len(roles) < 3 or roles[-1] != "assistant":
        raise ValueError(f"expected [system, user, assistant, (tool, assistant)*], got roles {roles}")
    glue = TurnGlue(tokenizer)
    p_ids = prompt_ids(tokenizer, messages[1]["content"], messages[0]["content"])
    ids, mask = [], []
    for k, m in enumerate(messages[2:], start=2):
        expected = "assistant" if k % 2 == 0 else "tool"
        if m["role"] != expected:
            raise ValueError(f"message {k} has role {m['role']!r}, expected {expected!r}")
        if m["role"] == "assistant":
            if not m["content"].startswith(THINK_PREFIX):
                raise ValueError(f"assistant message {k} must start with {THINK_PREFIX!r} (the forced prefix)")
            sampled = tokenizer(m["content"][len(THINK_PREFIX):], add_special_tokens=False)["input_ids"]
            injected = glue.close_ids(False) if k == len(messages) - 1 else []
        else:
            sampled, injected = [], glue.tool_ids(m["content"])
        ids += sampled + injected
        mask += [1] * len(sampled) + [0] * len(injected)
    return p_ids, ids, mask


def sampled_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal mask-1 runs of a trajectory: the tokens the policy sampled, one run per assistant turn."""
    return [[tok for tok, _ in run] for m, run in itertools.groupby(zip(ids, mask), key=lambda p: p[1]) if m]


def show_mask(trajectory: Trajectory, tokenizer, color: bool = True) -> str:
    """The trajectory's text with trained tokens (mask 1) and masked ones (mask 0) told apart.

    With `color`, trained text is green and masked text grey (ANSI); without, masked spans are wrapped
    in [[...]]. The prompt is masked too. This is the picture to look at when checking loss masking.
    """
    spans, current, run = [], 0, [*trajectory.prompt_ids]
    for tok, m in zip(trajectory.ids, trajectory.mask):
        if m != current:
            spans.append((current, run))
            current, run = m, []
        run.append(tok)
    spans.append((current, run))
    out = []
    for m, ids in spans:
        text = tokenizer.decode(ids)
        if color:
            out.append(f"\x1b[32m{text}\x1b[0m" if m else f"\x1b[90m{text}\x1b[0m")
        else:
            out.append(text if m else f"[[{text}]]")
    return "".join(out)
