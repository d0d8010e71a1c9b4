"""toy_judge.ToyRRM: the toy world's rule judges, answer-blind and oracle, score hand-built good and bad trajectories as
documented; the blind one never reads the gold chain."""
import random

import pytest

import toy_world as tw
from atomic_thought import Atom, ToolCall, make_turn
from toy_judge import ToyRRM, read_question
from search_env import Trajectory


@pytest.fixture(params=["blind", "oracle"])
def judge(request):
    return request.param


@pytest.fixture(scope="module")
def world():
    return tw.build_world(0)


def trajectory(question, turns, world):
    """A finished trajectory whose tool responses are the gold passages of the searched names."""
    passages = {d["title"]: d["contents"] for d in world.corpus}
    responses = [passages.get(t.tool_call.arguments["query"].split(" of ", 1)[-1], "no results")
                 for t in turns if t.tool_call]   # the teacher's query is "<relation> of <name>"
    return Trajectory(question["question"], question["golden_answers"], [], turns=turns, tool_responses=responses,
                      answer=turns[-1].answer, finish="answer", metadata=question["metadata"])


def mentor_question(world):
    # One whose subject and mentor were born in different cities (else the trap answer is right).
    return next(q for q in world.splits["test"] if q["metadata"]["type"] == "mentor_city"
                and q["metadata"]["trap"] != q["golden_answers"][0])


def test_gold_trajectory_scores_all_checkable_atoms_full(world, judge):
    q = mentor_question(world)
    t = trajectory(q, tw.teacher_turns(q, random.Random(0)), world)
    atr = ToyRRM(judge).score([t])[0]
    assert atr.scores == (10, 10, 5, 10) * 3
    assert atr.value == pytest.approx(35 / 40)


def test_premature_answer_loses_hypothesis_and_action(world, judge):
    q = mentor_question(world)
    t = trajectory(q, tw.teacher_turns(q, random.Random(0), premature_rate=1.0), world)
    atr = ToyRRM(judge).score([t])[0]
    # Turn 2 observes the subject (a relevant entity, not the bridge): 5; claims the trap: 0; neutral 5; answers
    # instead of searching the mentor: 0.
    assert atr.scores == (10, 10, 5, 10, 5, 0, 5, 0)
    assert atr.value == pytest.approx(45 / 80)


def test_misspelt_search_loses_the_action_point_without_any_outcome_signal(world, judge):
    q = next(q for q in world.splits["test"] if q["metadata"]["type"] == "city")
    good = tw.teacher_turns(q, random.Random(0))
    subject = q["metadata"]["subject"]
    wrong = " ".join(subject.split()[:2] + ["Zo" if subject.split()[2] != "Zo" else "Ba"])
    bad_first = make_turn([Atom("OBSERVATION", f"The question is about {subject}."),
                           Atom("HYPOTHESIS_TESTING", f"First I need facts about {subject}."),
                           Atom("RISK_ANALYSIS", "x"), Atom("ACTION", f"Search for {wrong}.")],
                          tool_call=ToolCall("web_search", {"query": wrong}))
    atr_good = ToyRRM(judge).score([trajectory(q, good, world)])[0]
    atr_bad = ToyRRM(judge).score([trajectory(q, [bad_first] + good, world)])[0]
    assert atr_bad.scores[3] == 0 and atr_good.scores[3] == 10
    assert atr_bad.value < atr_good.value


def test_unknown_tags_score_zero_and_malformed_trajectories_are_not_judged(world, judge):
    q = next(q for q in world.splits["test"] if q["metadata"]["type"] == "city")
    odd = make_turn([Atom("MUSING", q["metadata"]["subject"])], answer="x")
    rrm = ToyRRM(judge)
    atr = rrm.score([trajectory(q, [odd], world)])[0]
    assert atr.scores == (0,) and atr.value == 0
    broken = Trajectory(q["question"], q["golden_answers"], [], finish="format_error", metadata=q["metadata"])
    assert rrm.score([broken])[0].value is None and rrm.stats["format_skipped"] == 1


def test_the_blind_judge_reads_the_question_and_the_retrieved_text_never_the_gold_chain(world):
    q = mentor_question(world)
    t = trajectory(q, tw.teacher_turns(q, random.Random(0)), world)
    blind = ToyRRM("blind").score([t])[0].scores
    t.metadata = {}                                   # no gold chain, no trap: the oracle could not judge this
    assert ToyRRM("blind").score([t])[0].scores == blind == (10, 10, 5, 10) * 3
    with pytest.raises(KeyError):
        ToyRRM("oracle").score([t])
    # the same turns, but the mentor's passage was never retrieved: its city cannot be credited
    t.tool_responses = [t.tool_responses[0], "[no results for: birth city of someone]"]
    # (its observation still names the mentor, the newest retrieved value; the answer it holds and gives is not
    # grounded in anything retrieved)
    assert ToyRRM("blind").score([t])[0].scores[8:] == (10, 0, 5, 0)
    assert read_question(q["question"]) == (q["metadata"]["subject"], ("mentor", "birth city"))
    assert read_question("What is the capital of France?") is None
    with pytest.raises(ValueError, match="unknown toy judge"):
        ToyRRM("gold")
