"""The multi-turn rollout: token-in/token-out, loss masks, limits, and faults that never end an episode."""

import pytest
import torch

import toy_model
import toy_world as tw
from qa_data import write_jsonl
from atomic_thought import render_messages, system_prompt
from engine import HFEngine, SamplingParams
from retrievers import BM25Retriever, SearchError
from tools import Tools
from search_env import rollout, show_mask, TurnGlue
from toy_world import ToyTeacherEngine


@pytest.fixture(scope="module")
def world():
    return tw.build_world(0, tw.WorldConfig(n_train=40, n_dev=10, n_test=20, n_extra_people=20))


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory):
    return tw.build_tokenizer(world, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tools(world, tokenizer, tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_jsonl(world.corpus, corpus)
    return Tools(BM25Retriever(corpus), topk=3, max_response_tokens=200, tokenizer=tokenizer)


class ScriptedEngine(ToyTeacherEngine):
    """The toy teacher as an engine; records what it returned per conversation, or always searches."""
    sampler_logprob = -0.5

    def __init__(self, tokenizer, questions, premature_rate=0.0, always_search=False):
        super().__init__(tokenizer, questions, premature_rate=premature_rate, wrong_search_rate=0.0)
        self.always_search = always_search
        self.returned = {}   # question -> {turn index: the token ids returned for it}

    def turn_text(self, question, k):
        text = super().turn_text(question, 0 if self.always_search else k)
        self.returned.setdefault(question, {})[k] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text


def assistant_runs(t):
    """The mask-1 runs of a trajectory, in order: what the policy sampled, turn by turn."""
    runs, run = [], []
    for tok, m in zip(t.ids, t.mask):
        if m:
            run.append(tok)
        elif run:
            runs, run = runs + [run], []
    return runs + ([run] if run else [])


def test_mask_invariants_on_teacher_driven_rollouts(world, tokenizer, tools):
    questions = world.splits["test"][:9]
    engine = ScriptedEngine(tokenizer, questions)
    trajs = rollout(engine, tools, questions, tokenizer=tokenizer, params=SamplingParams(max_new_tokens=300),
                    group_size=2, tool_names=tw.TOOLS)
    assert len(trajs) == 18 and [t.question for t in trajs[:2]] == [questions[0]["question"]] * 2
    open_id, close_id = tokenizer.convert_tokens_to_ids(["<tool_response>", "</tool_response>"])
    for t in trajs:
        assert t.finish == "answer" and t.answer == t.golden_answers[0]
        assert len(t.ids) == len(t.mask) == len(t.logprobs)
        # decode(prompt_ids + ids) is exactly the chat-template rendering of the conversation.
        messages = render_messages(system_prompt(tw.TOOLS), t.question, t.turns, t.tool_responses)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert tokenizer.decode(t.prompt_ids + t.ids) == rendered == t.text
        # Every token inside a tool response is masked.
        inside = False
        for tok, m in zip(t.ids, t.mask):
            inside = (inside or tok == open_id) and tok != close_id
            assert not (inside and m), "a tool-response token is trained on"
        # The mask-1 runs are exactly what the engine returned, turn by turn, with its log-probs.
        assert assistant_runs(t) == [engine.returned[t.question][k] for k in range(len(t.turns))]
        assert all(lp == (-0.5 if m else 0.0) for lp, m in zip(t.logprobs, t.mask))
        assert t.n_tool_calls == len(t.turns) - 1 == len(t.tool_responses)
        assert t.tool_responses[0].count("\n") >= 1 and t.metadata["subject"] in t.tool_responses[0]


def test_real_tiny_model_rollout_keeps_engine_ids_and_masks(world, tokenizer, tools):
    torch.manual_seed(0)
    model = toy_model.build_tiny_model(tokenizer)
    calls = []

    class Recorder(HFEngine):
        def generate(self, prompts, params):
            out = super().generate(prompts, params)
            calls.append(out)
            return out

    questions = world.splits["test"][:4]
    trajs = rollout(Recorder(model, tokenizer), tools, questions, tokenizer=tokenizer,
                    params=SamplingParams(temperature=1.0, max_new_tokens=24), group_size=2, tool_names=tw.TOOLS)
    assert len(calls) == 1     # an untrained model never writes a valid turn: one generation call
    for t, c in zip(trajs, calls[0]):
        assert t.ids[:len(c.token_ids)] == c.token_ids and t.mask[:len(c.token_ids)] == [1] * len(c.token_ids)
        assert t.logprobs[:len(c.token_ids)] == c.logprobs and all(lp <= 0 for lp in c.logprobs)
        assert t.finish in ("format_error", "length") and not t.format_ok
        assert (t.format_error is not None) == (t.finish == "format_error")
        assert tokenizer.decode(t.prompt_ids + t.ids) == t.text


def test_turn_and_context_limits(world, tokenizer, tools):
    questions = world.splits["test"][:2]
    trajs = rollout(ScriptedEngine(tokenizer, questions, always_search=True), tools, questions,
                    tokenizer=tokenizer, params=SamplingParams(), max_turns=3, tool_names=tw.TOOLS)
    assert all(t.finish == "max_turns" and t.n_tool_calls == 3 for t in trajs)
    limit = len(trajs[0].prompt_ids) + 150
    trajs = rollout(ScriptedEngine(tokenizer, questions), tools, questions, tokenizer=tokenizer,
                    params=SamplingParams(), max_context=limit, tool_names=tw.TOOLS)
    assert all(t.finish == "length" and len(t.prompt_ids) + len(t.ids) <= limit for t in trajs)


def test_a_context_filled_to_the_limit_ends_the_episode_before_the_engine_sees_it(world, tokenizer, tools):
    """vLLM refuses a prompt of max_model_len tokens (= max_context), and under torchrun one rank's failed generate
    would leave the others waiting: a trajectory with no room left for one sampled token ends as "length"."""
    questions = world.splits["test"][:1]
    full = rollout(ScriptedEngine(tokenizer, questions), tools, questions, tokenizer=tokenizer,
                   params=SamplingParams(), tool_names=tw.TOOLS)[0]
    m = full.mask
    start = m.index(0)                                        # the first injected span: the first tool response
    end = next(i for i in range(start, len(m)) if m[i] == 1)  # where the second turn's sampled tokens begin
    for limit in (len(full.prompt_ids) + end, len(full.prompt_ids) + end + 1):   # exactly full, and one to spare
        seen = []

        class Watched(ScriptedEngine):
            def generate(self, prompts, params):
                seen.extend(len(p) for p in prompts)
                return super().generate(prompts, params)

        t = rollout(Watched(tokenizer, questions), tools, questions, tokenizer=tokenizer, params=SamplingParams(),
                    max_context=limit, tool_names=tw.TOOLS)[0]
        assert max(seen) < limit and t.finish == "length", (limit, seen, t.finish)
        assert len(seen) == (1 if limit == len(full.prompt_ids) + end else 2)


def test_a_failing_search_becomes_tool_text_and_the_episode_goes_on(world, tokenizer):
    class Down:
        def search(self, queries, k):
            raise SearchError("connection refused")

    broken = Tools(Down(), topk=3, tokenizer=tokenizer)
    questions = world.splits["test"][:2]
    trajs = rollout(ScriptedEngine(tokenizer, questions), broken, questions, tokenizer=tokenizer,
                    params=SamplingParams(), tool_names=tw.TOOLS)
    assert all(t.finish == "answer" and "fail" in t.tool_responses[0] for t in trajs)
    assert broken.stats["search_failures"] >= 2


def test_tool_glue_comes_from_the_chat_template(tokenizer):
    glue = TurnGlue(tokenizer)
    assert glue.close == "<|im_end|>\n"
    assert tokenizer.decode(glue.tool_ids("R")) == \
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nR\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_show_mask_marks_masked_spans(world, tokenizer, tools):
    questions = world.splits["test"][:1]
    t = rollout(ScriptedEngine(tokenizer, questions), tools, questions, tokenizer=tokenizer,
                params=SamplingParams(), tool_names=tw.TOOLS)[0]
    plain = show_mask(t, tokenizer, color=False)
    assert "[[<|im_end|>\n<|im_start|>user\n<tool_response>" in plain
    assert plain.replace("[[", "").replace("]]", "") == t.text
    assert "\x1b[32m" in show_mask(t, tokenizer)
