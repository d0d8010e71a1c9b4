"""The toy research world: determinism, disjoint splits, answerable chains, tokenizer, tiny model, teacher."""
import json
import random

import pytest
import torch

import toy_model
import toy_world as tw
from qa_data import write_jsonl
from atomic_thought import THINK_PREFIX, parse_turn, render_turn

ROLES = ("system", "user", "assistant")   # the chat template's role names


@pytest.fixture(scope="module")
def world():
    return tw.build_world(0)


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory):
    return tw.build_tokenizer(world, cache_dir=tmp_path_factory.mktemp("tok"))


def test_build_world_is_deterministic_for_a_seed(world):
    again = tw.build_world(0)
    assert again.corpus == world.corpus and again.splits == world.splits
    other = tw.build_world(1)
    assert other.splits["test"] != world.splits["test"]
    assert world.key() == again.key() != other.key()


def test_question_subjects_are_disjoint_across_splits_and_mentors_stay_in_split(world):
    subjects = {s: {q["metadata"]["subject"] for q in world.splits[s]} for s in tw.SPLITS}
    assert not subjects["train"] & subjects["test"]
    assert not subjects["train"] & subjects["dev"]
    assert not subjects["dev"] & subjects["test"]
    for split in tw.SPLITS:
        for q in world.splits[split]:
            if q["metadata"]["type"] == "mentor_city":
                assert world.people[q["metadata"]["bridge"]]["split"] == split
    # Answer-side entities are the fixed shared sets.
    answers = {q["golden_answers"][0] for s in tw.SPLITS for q in world.splits[s]}
    assert answers <= set(tw.CITIES) | set(world.company_founder.values())


def test_every_hop_value_is_in_its_gold_passage_and_the_answer_in_the_last(world):
    by_id = {d["id"]: d for d in world.corpus}
    assert len(by_id) == len(world.corpus)
    for split in tw.SPLITS:
        for q in world.splits[split]:
            hops = q["metadata"]["hops"]
            for hop in hops:
                text = by_id[hop["doc_id"]]["contents"]
                assert hop["search"] in text and hop["value"] in text
            assert q["golden_answers"][0] == hops[-1]["value"]
            assert {"id", "question", "golden_answers"} <= set(q)


def test_corpus_has_confusable_distractors(world):
    # Each subject shares its name with a travel passage or shares syllables with other people's passages.
    titles = [d["title"] for d in world.corpus]
    assert sum(t.endswith(" travels") for t in titles) > 500
    q = world.splits["test"][0]
    first, second, _ = q["metadata"]["subject"].split()
    sharing = [d for d in world.corpus if f"{first} {second}" in d["text"]]
    assert len(sharing) >= 1
    assert len(world.corpus) == len({d["contents"] for d in world.corpus})


def test_one_search_result_is_enough_the_teachers_query_ranks_its_gold_passage_first(world, tmp_path):
    # The toy world gives one result per search (TOPK): a query "<relation> of <name>" must put the gold passage
    # first, despite the travel passages and the names that share syllables (or would, in another order).
    from retrievers import BM25Retriever
    assert tw.TOPK == 1
    assert len({frozenset(name.split()) for name in world.people}) == len(world.people)
    write_jsonl(world.corpus, tmp_path / "corpus.jsonl")
    hops = [hop for q in world.splits["test"] for hop in q["metadata"]["hops"]]
    found = BM25Retriever(tmp_path / "corpus.jsonl").search([tw.search_query(h["search"], h["relation"]) for h in hops],
                                                            k=tw.TOPK)
    assert [docs[0].id for docs in found] == [h["doc_id"] for h in hops]


def test_tokenizer_round_trip_save_load_and_single_token_units(world, tokenizer, tmp_path):
    q = world.splits["test"][2]
    turns = tw.teacher_turns(q, random.Random(0))
    messages = tw.render_example(q, turns, ["<passage with <b>html</b> & \"quotes\">"] * len(turns))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(text)["input_ids"] == ids and loaded.chat_template == tokenizer.chat_template
    for tag in toy_model.FORMAT_TOKENS + toy_model.LAYOUT_TOKENS + toy_model.CHAT_TOKENS + (toy_model.TOOL_CALL_PREFIX,) + ROLES:
        assert len(tokenizer(tag)["input_ids"]) == 1, tag
    # The assistant's text spends no token on whitespace alone: it rides with the tags (LAYOUT_TOKENS).
    for m in messages:
        if m["role"] == "assistant":
            pieces = tokenizer.batch_decode([[i] for i in tokenizer(m["content"])["input_ids"]])
            assert not [p for p in pieces if not p.strip()], (m["content"], pieces)
    # Every rendered tool call starts with the one-token prefix, and the name after it keeps its own tokens.
    call = next(t for t in turns if t.tool_call)
    rendered = render_turn(call)
    assert toy_model.TOOL_CALL_PREFIX in rendered
    prefix_id = tokenizer.convert_tokens_to_ids(toy_model.TOOL_CALL_PREFIX)
    call_ids = tokenizer(rendered)["input_ids"]
    assert prefix_id in call_ids and tokenizer.decode(call_ids) == rendered
    name = tokenizer(" " + q["metadata"]["subject"])["input_ids"]
    assert any(call_ids[i:i + len(name)] == name for i in range(len(call_ids)))
    for syllable in tw.SYLLABLES:
        assert len(tokenizer(" " + syllable)["input_ids"]) == 1 and len(tokenizer(syllable)["input_ids"]) == 1
    # The grammar's tags survive decoding with special tokens skipped; chat markers do not.
    assert tokenizer.decode(tokenizer("<think>x</think><|im_end|>")["input_ids"], skip_special_tokens=True) \
        == "<think>x</think>"


def test_chat_template_renders_a_tool_turn_as_a_user_tool_response(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "<think>\nT\n</think>\n<tool_call>\n{}\n</tool_call>"},
                {"role": "tool", "content": "R"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\nT\n</think>\n<tool_call>\n{}\n</tool_call><|im_end|>\n"
                    "<|im_start|>user\n<tool_response>\nR\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    assert tokenizer.decode(out["input_ids"]) == text.removesuffix("<|im_start|>assistant\n")


def test_tiny_model_forward_pass(tokenizer):
    model = toy_model.build_tiny_model(tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.3e6 < n_params < 2e6
    assert model.config.model_type == "qwen2" and model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.tensor([tokenizer("Where was Ka Lo Mi born?")["input_ids"]])
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


def test_teacher_turns_are_well_formed_and_answer_correctly(world):
    rng = random.Random(0)
    for q in world.splits["train"][:60]:
        turns = tw.teacher_turns(q, rng)
        parsed = [parse_turn(render_turn(t), tools=tw.TOOLS) for t in turns]
        assert parsed == turns and all(render_turn(t).startswith(THINK_PREFIX) for t in turns)
        assert all(len(t.atoms) == 4 for t in turns)
        assert turns[-1].answer == q["golden_answers"][0]
        queries = [t.tool_call.arguments["query"] for t in turns[:-1]]
        assert queries == [f"{h['relation']} of {h['search']}" for h in q["metadata"]["hops"]]
        for t, h in zip(turns[1:], q["metadata"]["hops"]):   # observations quote the gold passage's sentence
            gold = next(d for d in world.corpus if d["id"] == h["doc_id"])
            assert t.atoms[0].text in gold["text"] and h["value"] in t.atoms[0].text


def test_teacher_flaws_are_controlled(world):
    rng = random.Random(0)
    two_hop = [q for q in world.splits["train"] if q["metadata"]["type"] != "city"][:40]
    for q in two_hop:
        turns = tw.teacher_turns(q, rng, premature_rate=1.0)
        assert len(turns) == 2 and turns[-1].answer == q["metadata"]["trap"]
        turns = tw.teacher_turns(q, rng, wrong_search_rate=1.0)
        first, second = (t.tool_call.arguments["query"] for t in turns[:2])
        subject, relation = q["metadata"]["subject"], q["metadata"]["hops"][0]["relation"]
        assert first != f"{relation} of {subject}" and second == f"{relation} of {subject}"
        assert turns[-1].answer == q["golden_answers"][0]


def test_write_world_gives_flashrag_files_and_a_loadable_model(tmp_path):
    small = tw.WorldConfig(n_train=20, n_dev=5, n_test=5, n_extra_people=5)
    world = tw.build_world(3, small)
    out = tw.write_world(world, tmp_path / "w", vocab_size=1024)
    rows = [json.loads(line) for line in open(out / "test.jsonl")]
    assert len(rows) == 15 and all(set(r) >= {"id", "question", "golden_answers"} for r in rows)
    corpus = [json.loads(line) for line in open(out / "corpus.jsonl")]
    assert all({"id", "contents"} <= set(d) for d in corpus)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.vocab_size == len(tok) and tok.chat_template
