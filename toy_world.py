"""The toy research world: the embedded default that lets the whole pipeline run on a laptop CPU.

A seeded synthetic knowledge base of fictional people, cities, countries and companies, rendered as a
FlashRAG-format passage corpus, with questions an agent can only answer by searching it, its scripted teacher, its
defaults (episode limits, topk, system prompt, the teacher's flaws), and a byte-level BPE tokenizer
trained on its text for toy_model.py's ~0.5M-parameter Qwen2 (the same code path as Qwen2.5-7B). Nothing here exists
in the paper: it is our stand-in for Wikipedia + NQ/HotpotQA, an LLM teacher and an LLM judge, so that
`python train.py` shows SFT -> GRPO learning in minutes (METHOD.md §10). No module of the method imports it: the
embedded default is wired in by train.py, evaluate.py and run_setup.py.

Design:
1. What the agent must copy is made of tokens it has seen. A person's name is three syllables written as
   three capitalised words ("Ka Lo Mi"), each syllable one token of the tokenizer (checked at build
   time), so spelling an unseen name into a query is copying three known tokens. Answer-side entities
   (24 cities in 8 countries, 16 companies and their 16 founders) are fixed sets shared by all splits.
2. Question subjects are disjoint across train/dev/test: no test question can be answered from memory.
3. Three question types (`QUESTION_TYPES`), each with its gold chain (what to search at each hop, the
   passage that answers it, the bridge entity):
   - `city`        1 hop : "Where was X born?"                        X -> city
   - `founder`     2 hops: "Who founded the company that X works for?" X -> company -> founder
   - `mentor_city` 2 hops: "Where was the mentor of X born?"           X -> mentor M -> M's city
   `mentor_city` is the hard type: the bridge is an unseen person of the same split, so its second hop
   exists only in the corpus, differs between splits, and needs a three-token name copied from a tool
   response. The subject's own birth city is one search away and a tempting wrong answer.
4. Distractors: every person shares syllables with many others (BM25 must match the full name; no two people
   share all three, in any order), extra people who are never asked about, and "travel" passages that put a
   person's name next to a city that is not their birth city.

The scripted teacher (`teacher_turns`) writes gold trajectories in the atomic-thought format (METHOD.md §2)
and is imperfect on purpose (`premature_rate`: answer before the last hop; `wrong_search_rate`: search
the wrong name first), so RL has something to improve. `ToyTeacherEngine` plays it behind the engine interface,
so teacher_data.py runs it through the real environment as it runs an LLM teacher.
Two choices make its text learnable by a tiny model in minutes (LOG.md): every name it copies follows a
space, so it is the same token everywhere (queries are "mentor of Ka Lo Mi", not "Ka Lo Mi", whose first
syllable after a quote would be a different token); and its observations quote the retrieved sentence
("Ka Lo Mi was born in Savora.") rather than rephrase it, so reading a value is copying it. And the text is
short, because the demo's time is proportional to its tokens: one result per search, a one-line system prompt,
and the tool call's fixed JSON start as one token (`TOOL_CALL_PREFIX`).

Its judges, rules standing in for the LLM judge, are in toy_judge.py.

What this world does not model: paraphrase, ambiguity, noisy or contradictory sources, long documents.

Run `python toy_world.py` for a sample, `python toy_world.py --out DIR` to write the world
(corpus/train/dev/test jsonl) and an untrained tiny model with its tokenizer to DIR/model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from atomic_thought import CANONICAL_TAGS, THINK_PREFIX, Atom, ToolCall, Turn, make_turn, render_messages, render_turn
from engine import Completion
from qa_data import write_jsonl
from toy_model import build_tiny_model, cached_tokenizer

SYLLABLES = ("Ba Da Fe Gi Ka Lu Mo Ni Pa Ri Sa Tu Ve Zo Bi Du Fo Ga Ke Li "
             "Ma Nu Pe Ro Si Te Vu Za Bo De Fi Gu Ko Le Mi Ne Po Ru Se Ti").split()
COUNTRIES = "Aldoria Brevania Castemor Dunmark Elvaria Fenwold Gorvania Halsund".split()
CITIES = ("Vendal Korvath Ostrel Mirelle Tarvos Quennel Brisca Olvane Drumlin Savora Pellin Corvane "
          "Jastel Norwick Umbrel Varenne Ketterby Loswen Marrow Fallon Grisby Hathel Ivrel Yarrow").split()
COMPANIES = ("Zentrix Quorra Helvix Atrano Bexley Cindral Dovanta Elmcrest "
             "Fyrlo Gantrel Holtway Ixora Jubran Kelvane Lumora Mordane").split()
QUESTION_TYPES = ("city", "founder", "mentor_city")
SPLITS = ("train", "dev", "test")
# The roles of the four canonical atomic thoughts, as the toy teacher writes them and its judge scores them.
OBSERVATION, HYPOTHESIS, RISK, ACTION = CANONICAL_TAGS
TOOLS = ("web_search",)  # the toy world offers search only: its passages have no web addresses to browse
# The toy system prompt (our choice): a tiny model cannot read JSON schemas, and the paper's prompt says nothing
# about atoms either (the format comes from SFT). Short, because every prompt token is paid for in every rollout.
# It avoids the passages' relation words ("born in", "works for"): the model reads a value by finding the word
# before it in the search result, and "reason in <think>" gave it three other places to look. With "in", one seed
# of three had not learnt to read by SFT step 600; with "within", five of five had (LOG.md 2026-11-26, third).
SYSTEM = ("Search, then answer: reason within <think>, then call web_search within <tool_call> "
          "or answer within <answer>.")
# Results per search (our choice). With one, the tiny model learnt to read values out of tool responses after
# 300-500 whole-trajectory SFT steps on three seeds; with two, after 400-800 on two (LOG.md 2026-11-26).
TOPK = 1
# Episode limits of the toy world (paper: 10 turns, 2,000 new tokens, 32k context): a teacher episode is at most
# 4 turns of ~50 tokens and ~370 tokens in all (200 on average). train.py and evaluate.py both use these.
LIMITS = dict(max_turns=4, max_new_tokens=96, max_context=1024)
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
TEXT_VERSION = 7         # bump when the corpus or teacher text changes: the tokenizer cache is keyed on it


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world; the defaults are those of the working prototype (feasibility note)."""
    n_train: int = 1200          # question subjects per split (disjoint people)
    n_dev: int = 100
    n_test: int = 200
    n_extra_people: int = 300   # people who are never asked about: distractors only
    travel_rate: float = 0.5    # share of people with a distractor "travel" passage


@dataclass
class World:
    """The built world: corpus passages, questions per split, and the entity tables behind them."""
    seed: int
    config: WorldConfig
    corpus: list[dict]                       # FlashRAG: {"id", "title", "text", "contents"}
    splits: dict[str, list[dict]]            # FlashRAG questions: {"id", "question", "golden_answers", "metadata"}
    people: dict[str, dict] = field(repr=False, default_factory=dict)   # name -> {"city", "company", "mentor", "split"}
    city_country: dict[str, str] = field(repr=False, default_factory=dict)
    company_founder: dict[str, str] = field(repr=False, default_factory=dict)

    def key(self) -> str:
        """A short hash naming this world (seed + config + text format): the cache key for tokenizer and corpus."""
        return hashlib.sha256(json.dumps([self.seed, asdict(self.config), TEXT_VERSION]).encode()).hexdigest()[:12]


# How each relation is stated in the corpus; the teacher observes a fact by quoting its sentence.
FACTS = {"birth city": "{e} was born in {v}.", "employer": "{e} works for {v}.",
         "mentor": "The mentor of {e} is {v}.", "founder": "{e} is a company founded by {v}."}


def fact(relation: str, entity: str, value: str) -> str:
    return FACTS[relation].format(e=entity, v=value)


def _passage(pid: str, title: str, text: str) -> dict:
    # FlashRAG / Search-R1 wiki-18 convention: contents = quoted title line, then the text.
    return {"id": pid, "title": title, "text": text, "contents": f'"{title}"\n{text}'}


def build_world(seed: int = 0, config: WorldConfig = WorldConfig()) -> World:
    """Build the world deterministically from `seed` (pure Python, well under a second)."""
    rng = random.Random(seed)
    city_country = {c: COUNTRIES[i % len(COUNTRIES)] for i, c in enumerate(CITIES)}   # 3 cities per country
    n_people = config.n_train + config.n_dev + config.n_test + config.n_extra_people + len(COMPANIES)
    # No two names share a syllable set: BM25 is bag-of-words, so "Gi Du Le" and "Gi Le Du" would tie for the
    # top result, and with one result per search the agent would read the wrong person's facts.
    names: dict[frozenset, str] = {}
    while len(names) < n_people:                       # C(40, 3) = 9,880 syllable sets
        syllables = rng.sample(SYLLABLES, 3)
        names.setdefault(frozenset(syllables), " ".join(syllables))
    names_list = sorted(names.values())
    rng.shuffle(names_list)
    founders, rest = names_list[:len(COMPANIES)], names_list[len(COMPANIES):]
    company_founder = dict(zip(COMPANIES, founders))
    sizes = {"train": config.n_train, "dev": config.n_dev, "test": config.n_test, "extra": config.n_extra_people}
    people: dict[str, dict] = {}
    start = 0
    for split, n in sizes.items():
        group = rest[start:start + n]
        start += n
        for i, name in enumerate(group):
            # Mentors come from the same split, so a mentor_city answer never leaks across splits.
            mentor = group[(i + 1 + rng.randrange(n - 1)) % n] if n > 1 else name
            people[name] = {"city": rng.choice(CITIES), "company": rng.choice(COMPANIES), "mentor": mentor,
                            "split": split}
    for founder, company in zip(founders, COMPANIES):
        people[founder] = {"city": rng.choice(CITIES), "company": company, "mentor": None, "split": "founder"}

    corpus, doc_of = [], {}
    for name, p in people.items():
        facts = [fact("birth city", name, p["city"]), fact("employer", name, p["company"])]
        if p["mentor"]:
            facts.append(fact("mentor", name, p["mentor"]))
        doc_of[name] = f"p{len(corpus)}"
        corpus.append(_passage(doc_of[name], name, " ".join(facts)))
        if rng.random() < config.travel_rate:   # a distractor: the name next to a city that is not the birth city
            city = rng.choice([c for c in CITIES if c != p["city"]])
            corpus.append(_passage(f"t{len(corpus)}", f"{name} travels",
                                   f"{name} once travelled to {city} to visit a friend."))
    for city, country in city_country.items():
        doc_of[city] = f"c{len(corpus)}"
        corpus.append(_passage(doc_of[city], city, f"{city} is a city in {country}."))
    for company, founder in company_founder.items():
        doc_of[company] = f"c{len(corpus)}"
        corpus.append(_passage(doc_of[company], company,
                               fact("founder", company, founder)
                               + f" Its head office is in {people[founder]['city']}."))

    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for name, p in people.items():
        if p["split"] not in splits:
            continue
        mentor = p["mentor"]
        chains = {
            "city": (f"Where was {name} born?", p["city"],
                     [(name, "birth city", p["city"])]),
            "founder": (f"Who founded the company that {name} works for?", company_founder[p["company"]],
                        [(name, "employer", p["company"]), (p["company"], "founder", company_founder[p["company"]])]),
            "mentor_city": (f"Where was the mentor of {name} born?", people[mentor]["city"],
                            [(name, "mentor", mentor), (mentor, "birth city", people[mentor]["city"])]),
        }
        # The wrong answer a premature stop gives (used by the flawed teacher; never shown to the agent).
        traps = {"city": None, "founder": p["company"], "mentor_city": p["city"]}
        for qtype in QUESTION_TYPES:
            question, answer, chain = chains[qtype]
            hops = [{"search": s, "doc_id": doc_of[s], "relation": r, "value": v} for s, r, v in chain]
            splits[p["split"]].append({
                "id": f"{p['split']}_{len(splits[p['split']])}", "question": question, "golden_answers": [answer],
                "metadata": {"type": qtype, "subject": name, "hops": hops,
                             "bridge": chain[0][2] if len(chain) > 1 else None, "trap": traps[qtype]}})
    return World(seed, config, corpus, splits, people, city_country, company_founder)


# ----------------------------------------------------------------------------- the scripted teacher
def search_query(entity: str, relation: str) -> str:
    """The teacher's query, e.g. "mentor of Ka Lo Mi".

    The entity follows a word, so its first syllable is the same token (" Ka", with its space) as in questions
    and passages; at the start of the JSON string it would be "Ka", another token the tiny model would have to
    learn to map to (the first syllable was the one it got wrong, LOG.md).
    """
    return f"{relation} of {entity}"


# The teacher's flaws for the demo's SFT data (train.py, `teacher_data.py`). Premature answers at 0.7 make greedy
# decoding after SFT stop after one hop on every seed (at 0.6 the founder type came out of SFT anywhere from 0 to 92
# F1), while sampling at T = 0.7 still goes on to the second hop often enough for GRPO to find it (at 0.8 one of two
# seeds sampled it in ~5% of 2-hop episodes and GRPO learnt nothing). LOG.md 2026-11-26 (second session).
TEACHER_FLAWS = dict(premature_rate=0.7, wrong_search_rate=0.1)
SFT_QUESTIONS = 1500     # train-split questions the demo's teacher answers (GRPO samples from all of them)


def teacher_turns(question: dict, rng: random.Random, premature_rate: float = 0.0,
                  wrong_search_rate: float = 0.0) -> list[Turn]:
    """The assistant turns of a scripted teacher for one toy question (its gold chain in `metadata`).

    Correct behaviour: one search per hop, then the answer, with the four canonical atomic thoughts in
    every turn. Controlled flaws (our choice, so that RL has something to improve):
    - `premature_rate`: on a 2-hop question, answer right after the first search with the value at hand
      (the employer instead of its founder; the subject's own birth city instead of the mentor's);
    - `wrong_search_rate`: the first search uses a wrong name (one syllable changed), then the teacher
      notices and searches the right one.
    The teacher never reads tool responses: its actions depend only on the gold chain.
    """
    meta = question["metadata"]
    hops, subject = meta["hops"], meta["subject"]
    turns = []

    def search_turn(observation: str, hypothesis: str, risk: str, entity: str, relation: str) -> Turn:
        return make_turn([Atom(OBSERVATION, observation), Atom(HYPOTHESIS, hypothesis),
                          Atom(RISK, risk), Atom(ACTION, f"Search {entity}.")],
                         tool_call=ToolCall("web_search", {"query": search_query(entity, relation)}))

    if rng.random() < wrong_search_rate:
        syllables = subject.split()
        syllables[-1] = rng.choice([s for s in SYLLABLES if s not in syllables])
        wrong = " ".join(syllables)
        turns.append(search_turn(f"The question is about {subject}.", f"I need facts about {wrong}.",
                                 "Similar names exist.", wrong, hops[0]["relation"]))
        turns.append(search_turn(f"The results are about {wrong}, not {subject}.", f"I need facts about {subject}.",
                                 "Similar names exist.", subject, hops[0]["relation"]))
    else:
        turns.append(search_turn(f"The question is about {subject}.", f"I need facts about {subject}.",
                                 "Similar names exist.", subject, hops[0]["relation"]))
    for i, hop in enumerate(hops):
        # The observation quotes the passage's sentence: reading a value is then copying, which a tiny model
        # learns within the demo's budget; a rephrased observation needs a learnt relation mapping on top.
        observation = fact(hop["relation"], hop["search"], hop["value"])
        if i < len(hops) - 1 and rng.random() < premature_rate:
            # Flaw: stop one hop early and answer with the tempting value at hand (metadata "trap").
            trap = meta["trap"]
            if meta["type"] == "mentor_city":
                observation = fact("birth city", subject, trap)
            turns.append(make_turn([Atom(OBSERVATION, observation),
                                    Atom(HYPOTHESIS, f"The answer is {trap}."),
                                    Atom(RISK, "Not checked further."),
                                    Atom(ACTION, f"Answer {trap}.")], answer=trap))
            return turns
        if i == len(hops) - 1:
            turns.append(make_turn([Atom(OBSERVATION, observation),
                                    Atom(HYPOTHESIS, f"The answer is {hop['value']}."),
                                    Atom(RISK, f"The evidence names {hop['search']}."),
                                    Atom(ACTION, f"Answer {hop['value']}.")], answer=hop["value"]))
        else:
            nxt = hops[i + 1]
            turns.append(search_turn(observation, f"I need the {nxt['relation']} of {nxt['search']}.",
                                     f"{hop['value']} must be exact.", nxt["search"], nxt["relation"]))
    return turns


class ToyTeacherEngine:
    """The scripted teacher behind the engine interface (engine.py): plays `teacher_turns` as token ids, so that
    teacher_data.make_teacher_data runs it through the real environment exactly as it runs an LLM teacher.

    It recognises the conversation by its question text and counts the tool responses so far to know which
    turn to play. Its flaws are drawn once per trajectory (deterministically from `seed`).
    """

    def __init__(self, tokenizer, questions: list[dict], *, premature_rate: float, wrong_search_rate: float,
                 seed: int = 0):
        rng = random.Random(seed)
        self.tokenizer = tokenizer
        self.turns = {q["question"]: teacher_turns(q, rng, premature_rate, wrong_search_rate) for q in questions}

    sampler_logprob = 0.0   # the log-prob reported for every played token (a script has no distribution)

    def conversation_state(self, prompt_ids: list[int]) -> tuple[str, int]:
        """(question, number of tool responses so far) of a ChatML conversation."""
        text = self.tokenizer.decode(prompt_ids)
        question = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        return question, text.split("<|im_start|>assistant", 1)[1].count("<tool_response>")

    def turn_text(self, question: str, k: int) -> str:
        """The assistant text of turn k, after the forced `<think>` prefix."""
        return render_turn(self.turns[question][k])[len(THINK_PREFIX):]

    def generate(self, prompt_ids_list, params) -> list[Completion]:
        out = []
        for ids in prompt_ids_list:
            turn_ids = self.tokenizer(self.turn_text(*self.conversation_state(ids)),
                                      add_special_tokens=False)["input_ids"][:params.max_new_tokens]
            out.append(Completion(turn_ids, [self.sampler_logprob] * len(turn_ids), "stop",
                                  self.tokenizer.decode(turn_ids)))
        return out


def render_teacher_text(question: dict, turns: list[Turn]) -> str:
    """Plain text of a teacher trajectory (tool responses left out): tokenizer training text and samples."""
    return "\n".join([SYSTEM, question["question"]] + [render_turn(t) for t in turns])


# ----------------------------------------------------------------------------- its tokenizer, model and files
def build_tokenizer(world: World, vocab_size: int = 1024, cache_dir: str | os.PathLike | None = None):
    """A byte-level BPE tokenizer trained on the world's text (toy_model.cached_tokenizer), as a transformers
    tokenizer with a chat template. Every name syllable must come out as one token with and without a leading space
    (the copy-ability requirement above), which is checked, not assumed. Cached under `cache_dir` (default
    data/toy-<world key>/tokenizer-<vocab_size>) and loaded from there on the next call."""
    rng = random.Random(world.seed)
    texts = [d["contents"] for d in world.corpus]
    for split in SPLITS:
        texts += [q["question"] for q in world.splits[split]]
    for q in rng.sample(world.splits["train"], min(600, len(world.splits["train"]))):
        texts.append(render_teacher_text(q, teacher_turns(q, rng, premature_rate=0.5, wrong_search_rate=0.3)))
    # Every syllable, alone and after a space, often enough to be merged whatever the world's size.
    texts += ["\n".join(SYLLABLES) + "\n" + " ".join(SYLLABLES)] * 50
    path = Path(cache_dir or DEFAULT_DATA_DIR / f"toy-{world.key()}") / f"tokenizer-{vocab_size}"
    return cached_tokenizer(path, texts, vocab_size, one_token=[f for s in SYLLABLES for f in (s, " " + s)])


def write_world(world: World, out_dir: str | os.PathLike, vocab_size: int = 1024) -> Path:
    """Write corpus.jsonl, {train,dev,test}.jsonl and an untrained tiny model + tokenizer to out_dir/model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in [("corpus", world.corpus)] + [(s, world.splits[s]) for s in SPLITS]:
        write_jsonl(rows, out / f"{name}.jsonl")
    tokenizer = build_tokenizer(world, vocab_size)
    model = build_tiny_model(tokenizer, seed=world.seed)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    return out


def render_example(question: dict, turns: list[Turn], passages: list[str]) -> list[dict]:
    """The chat messages of a teacher trajectory, with `passages[i]` as the response to the i-th tool call."""
    return render_messages(SYSTEM, question["question"], turns, passages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="world seed (people, attributes, splits)")
    parser.add_argument("--out", default=None, help="write the world and an untrained tiny model to this folder")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size of the toy tokenizer")
    args = parser.parse_args()
    world = build_world(args.seed)
    if args.out:
        out = write_world(world, args.out, args.vocab_size)
        print(f"wrote {len(world.corpus)} passages, " + ", ".join(f"{len(world.splits[s])} {s}" for s in SPLITS)
              + f" questions and an untrained tiny model to {out}")
        return
    from atomic_thought import parse_turn
    by_id = {d["id"]: d for d in world.corpus}
    tokenizer = build_tokenizer(world, args.vocab_size)
    model = build_tiny_model(tokenizer)
    print(f"toy world seed {args.seed}: {len(world.corpus)} passages; "
          + ", ".join(f"{s} {len(world.splits[s])}" for s in SPLITS) + " questions; "
          f"vocab {len(tokenizer)}; tiny Qwen2 with {sum(p.numel() for p in model.parameters()):,} parameters\n")
    question = next(q for q in world.splits["test"] if q["metadata"]["type"] == "mentor_city")
    print(f"question: {question['question']}   golden answers: {question['golden_answers']}")
    for i, hop in enumerate(question["metadata"]["hops"], 1):
        print(f"  hop {i}: search {hop['search']!r} -> {hop['relation']} = {hop['value']!r}   "
              f"gold passage {hop['doc_id']}: {by_id[hop['doc_id']]['text']}")
    turns = teacher_turns(question, random.Random(0))
    gold = [by_id[h["doc_id"]]["contents"] for h in question["metadata"]["hops"]]
    messages = render_example(question, turns, gold)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    print(f"\nexample trajectory (scripted teacher, gold passages as tool responses; "
          f"{len(tokenizer(text)['input_ids'])} tokens):\n{text}")
    print("parsed assistant turns:")
    for m in messages:
        if m["role"] == "assistant":
            t = parse_turn(m["content"], tools=TOOLS)
            action = f"tool_call {t.tool_call.arguments}" if t.tool_call else f"answer {t.answer!r}"
            print(f"  {len(t.atoms)} atoms {[a.tag for a in t.atoms]} -> {action}")


if __name__ == "__main__":
    main()
