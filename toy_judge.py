"""The toy world's judges: rules that stand in for the LLM judge (the RRM) on the CPU demo and in the ablations.

Nothing here is the paper's judge (METHOD.md §10). Both score every atomic thought 0-10 and go behind
rrm_reward's interface as `ToyRRM` (ATR = the aggregate of the scores / 10, well-formed trajectories only):
- `blind_atom_scores` (`--toy-judge blind`, bench/ablation.py's default) sees what an LLM judge sees: the question,
  the atoms, the tool calls and the retrieved text. It reads the question as the agent must (which relations, in
  which order: "the mentor of X" then "where ... born") and follows the chain through the facts the tool responses
  state, in the world's sentence forms ("X was born in Y."). It never sees the gold chain or the golden answer:
  an atom is credited for being grounded in what was retrieved and for moving toward what the question asks.
  Because the toy corpus is truthful, a chain followed this way ends at the golden answer whenever it was
  retrieved; that is the same agreement an LLM judge reading correct evidence would show.
- `oracle_atom_scores` (`--toy-judge oracle`, train.py's default, the rule of the earlier sessions' runs) scores
  against the question's gold chain in `metadata`: it knows which passage answers each hop, and its answering
  ACTION gets 10 only when it names the chain's final value, the golden answer. Its ATR is thus partly a second
  outcome reward.
Both give RISK_ANALYSIS a neutral 5 (a rule cannot judge it) and an unknown tag 0.
"""
from __future__ import annotations

import re

from atomic_thought import Turn
from rrm_reward import ATR, RRM
from toy_world import ACTION, FACTS, HYPOTHESIS, OBSERVATION, RISK

JUDGES = ("blind", "oracle")


def _names(text: str, entity: str) -> bool:
    """Whole-word mention: "Ka Lo Mi" in "... of Ka Lo Mi." but not in "Ka Lo Mira"."""
    return re.search(rf"(?<!\w){re.escape(entity)}(?!\w)", text) is not None


def score_turn(turn: Turn, focus: str, seen: list[str], target: str | None) -> list[tuple[float, str]]:
    """The atoms of one turn, given where the chain stands before it: `focus` is the newest value reached (the
    subject before any), `seen` every entity reached so far, `target` the entity to look up next (None once the
    chain is complete, when the turn should answer `focus`). Both judges score through this; they differ only in how
    they know where the chain stands.
      OBSERVATION        10 if it names the focus, 5 if it names another entity seen so far, else 0;
      HYPOTHESIS_TESTING 10 if it names the focus, else 0;
      ACTION             10 if it searches the target, or, with the chain complete, answers with the focus; else 0;
      RISK_ANALYSIS      5: a rule cannot judge it, so it is neutral; other tags 0.
    """
    scored = []
    for atom in turn.atoms:
        if atom.tag == OBSERVATION:
            score = 10 if _names(atom.text, focus) else 5 if any(_names(atom.text, e) for e in seen) else 0
            reason = f"observes {focus}" if score == 10 else f"does not name {focus}"
        elif atom.tag == HYPOTHESIS:
            score, reason = (10, f"holds {focus}") if _names(atom.text, focus) else (0, f"misses {focus}")
        elif atom.tag == ACTION:
            acted = turn.answer if target is None else turn.tool_call
            goal = focus if target is None else target
            ok = acted is not None and _names(atom.text, goal)
            score, reason = (10, f"acts on {goal}") if ok else (0, f"should act on {goal}")
        elif atom.tag == RISK:
            score, reason = 5, "neutral: not judged by the rule"
        else:
            score, reason = 0, f"unknown tag {atom.tag}"
        scored.append((float(score), reason))
    return scored


# ----------------------------------------------------------------------------- the answer-blind judge
# What each toy question asks, read from its text: the subject, then the relations to follow from it, in order.
_QUESTIONS = ((re.compile(r"^Where was the mentor of (.+) born\?$"), ("mentor", "birth city")),
              (re.compile(r"^Who founded the company that (.+) works for\?$"), ("employer", "founder")),
              (re.compile(r"^Where was (.+) born\?$"), ("birth city",)))
_NAME = r"([A-Z][a-z]+(?: [A-Z][a-z]+)*)"
_FACT_PATTERNS = {relation: re.compile(re.escape(form).replace(r"\{e\}", _NAME).replace(r"\{v\}", _NAME))
                  for relation, form in FACTS.items()}


def read_question(question: str) -> tuple[str, tuple[str, ...]] | None:
    """(subject, relations to follow) of a toy question, or None for a question of another form."""
    for pattern, relations in _QUESTIONS:
        m = pattern.match(question)
        if m:
            return m.group(1), relations
    return None


def retrieved_value(responses: list[str], relation: str, entity: str) -> str | None:
    """The value that the retrieved text states for `relation` of `entity`, e.g. "Ka Lo Mi works for Zentrix.";
    None when no response states it (a "travel" passage states no birth city)."""
    for response in responses:
        for m in _FACT_PATTERNS[relation].finditer(response):
            if m.group(1) == entity:
                return m.group(2)
    return None


def blind_atom_scores(question: str, turns: list[Turn], tool_responses: list[str]) -> list[tuple[float, str]]:
    """Score every atomic thought 0-10 from the question and what was retrieved: (score, reason) per atom, in order.

    Before turn k the judge follows the question's relations through the tool responses of turns < k; the chain
    stands at the newest value they state (the subject before any), and the next entity to look up is the one whose
    relation they do not state yet (`score_turn`). An answer before the chain is complete is not grounded in
    anything retrieved, so its ACTION gets 0.
    A question of another form gets 5 for every atom: nothing to judge it by.
    """
    parsed = read_question(question)
    scored = []
    for k, turn in enumerate(turns):
        if parsed is None:
            scored += [(5.0, "question not understood: neutral")] * len(turn.atoms)
            continue
        subject, relations = parsed
        chain, entity = [], subject
        for relation in relations:               # follow the question's relations through what was retrieved
            value = retrieved_value(tool_responses[:k], relation, entity)
            if value is None:
                break
            chain.append(value)
            entity = value
        done = len(chain) == len(relations)
        scored += score_turn(turn, chain[-1] if chain else subject, [subject, *chain], None if done else entity)
    return scored


# ----------------------------------------------------------------------------- the oracle judge
def oracle_atom_scores(turns: list[Turn], tool_responses: list[str], metadata: dict) -> list[tuple[float, str]]:
    """Score every atomic thought 0-10 against the question's gold chain: (score, reason) per atom, in order.

    Before turn k the agent has *retrieved* hop i of the gold chain when an earlier tool response holds both the
    hop's entity and its value (the gold passage does); the chain stands at the newest value of the hops retrieved
    in order, and the next entity to look up is the next hop's (`score_turn`). A premature answer thus loses the
    HYPOTHESIS and ACTION points of its last turn, and a search for a misspelt name loses the ACTION point, even when
    no F1 distinguishes them (the sparse-outcome regime).
    """
    hops, subject = metadata["hops"], metadata["subject"]
    scored = []
    for k, turn in enumerate(turns):
        seen = tool_responses[:k]
        got = [i for i, h in enumerate(hops)
               if any(_names(r, h["search"]) and _names(r, h["value"]) for r in seen)]
        n_done = 0
        while n_done < len(hops) and n_done in got:   # hops count in chain order only
            n_done += 1
        focus = hops[n_done - 1]["value"] if n_done else subject
        target = hops[n_done]["search"] if n_done < len(hops) else None
        scored += score_turn(turn, focus, [subject] + [h["value"] for h in hops[:n_done]], target)
    return scored


class ToyRRM(RRM):
    """A toy judge behind rrm_reward's interface: `judge="blind"` (blind_atom_scores) or "oracle"
    (oracle_atom_scores); not an LLM and not the paper's RRM (module docstring)."""

    def __init__(self, judge: str = "oracle", *, aggregation: str = "mean"):
        super().__init__(aggregation=aggregation)
        if judge not in JUDGES:
            raise ValueError(f"unknown toy judge {judge!r}; choose one of {JUDGES}")
        self.judge = judge

    def _judge(self, trajectories: list) -> list[ATR]:
        out = []
        for t in trajectories:
            scored = (blind_atom_scores(t.question, t.turns, t.tool_responses) if self.judge == "blind" else
                      oracle_atom_scores(t.turns, t.tool_responses, t.metadata))
            self.stats["calls"] += 1
            out.append(self._atr(t, [s for s, _ in scored], [r for _, r in scored]))
        return out
