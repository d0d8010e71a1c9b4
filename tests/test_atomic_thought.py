"""The atomic-thought grammar: round trip, one test per malformed case, linear-time parsing."""
import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atomic_thought import (CANONICAL_TAGS, SYSTEM_PROMPT, TOOL_SCHEMAS, Atom, FormatError, ToolCall, Turn,
                            make_turn, parse_turn, render_turn, system_prompt)

SEARCH = '<tool_call>\n{"name": "web_search", "arguments": {"query": "q"}}\n</tool_call>'
THINK = "<think>\n<OBSERVATION> seen </OBSERVATION>\n</think>\n"


# ---------------------------------------------------------------- round trip (property test)
# Text that cannot form a tag of the grammar: no '<' ... '>' pairs, stripped, may be empty.
_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>"), max_size=40).map(str.strip)
_tag = st.one_of(st.sampled_from(CANONICAL_TAGS), st.from_regex(r"[A-Z][A-Z0-9_]{0,12}", fullmatch=True))
_atoms = st.lists(st.builds(Atom, _tag, _text), max_size=6)
_nonempty = _text.filter(bool)
_tool_call = st.one_of(
    st.builds(lambda q: ToolCall("web_search", {"query": q}), _nonempty),
    st.builds(lambda urls, q: ToolCall("browse_webpage", {"url_list": urls, "query": q}),
              st.lists(_nonempty, min_size=1, max_size=3), _nonempty))


@settings(max_examples=300, deadline=None)
@given(_atoms, st.one_of(_tool_call, _nonempty))
def test_round_trip(atoms, action):
    turn = make_turn(atoms, tool_call=action) if isinstance(action, ToolCall) else make_turn(atoms, answer=action)
    assert parse_turn(render_turn(turn)) == turn


def test_canonical_turn_parses_to_atoms_in_order():
    text = ("<think>\n<OBSERVATION> a </OBSERVATION>\nfree text between atoms is allowed\n"
            "<HYPOTHESIS_TESTING> b </HYPOTHESIS_TESTING><RISK_ANALYSIS>c</RISK_ANALYSIS>\n<ACTION> d </ACTION>\n</think>\n"
            "<answer> Paris </answer>")
    turn = parse_turn(text)
    assert [a.tag for a in turn.atoms] == list(CANONICAL_TAGS)
    assert [a.text for a in turn.atoms] == ["a", "b", "c", "d"]
    assert turn.answer == "Paris" and turn.tool_call is None


def test_plain_think_without_atoms_is_well_formed():
    turn = parse_turn("<think>just reasoning</think><answer>x</answer>")
    assert turn.atoms == () and turn.think == "just reasoning"


def test_text_inside_blocks_may_hold_angle_brackets_that_are_not_tags():
    turn = parse_turn("<think><OBSERVATION> a < b and <b>bold</b> </OBSERVATION></think><answer>1 < 2</answer>")
    assert turn.atoms[0].text == "a < b and <b>bold</b>" and turn.answer == "1 < 2"


def test_system_prompt_lists_exactly_the_offered_tools():
    for name, schema in TOOL_SCHEMAS.items():
        assert json.dumps(schema) in SYSTEM_PROMPT
    only_search = system_prompt(("web_search",))
    assert "browse_webpage" not in only_search
    with pytest.raises(ValueError, match="unknown tool"):
        system_prompt(("calculator",))


# ---------------------------------------------------------------- malformed turns: one per case
MALFORMED = {
    "unbalanced: never closed": (THINK + "<answer>x", "never closed"),
    "unbalanced: stray close": (THINK + "</tool_call>" + SEARCH, "unbalanced"),
    "unbalanced atom": ("<think><OBSERVATION> a </think>" + SEARCH, "not closed"),
    "mismatched atom close": ("<think><OBSERVATION> a </ACTION></think>" + SEARCH, "unbalanced"),
    "nested atoms": ("<think><OBSERVATION> a <ACTION> b </ACTION></OBSERVATION></think>" + SEARCH, "nested"),
    "nested blocks": ("<think> a <answer>x</answer></think>" + SEARCH, "nested"),
    "text before think": ("hello " + THINK + SEARCH, "outside"),
    "text between blocks": (THINK + "so: " + SEARCH, "outside"),
    "text after action": (THINK + SEARCH + " trailing", "after the action"),
    "invalid JSON": (THINK + '<tool_call>{"name": "web_search", </tool_call>', "invalid tool-call JSON"),
    "JSON not an object": (THINK + "<tool_call>[1, 2]</tool_call>", "must be"),
    "unknown tool": (THINK + '<tool_call>{"name": "calc", "arguments": {"query": "q"}}</tool_call>', "unknown tool"),
    "missing argument": (THINK + '<tool_call>{"name": "web_search", "arguments": {}}</tool_call>', "missing"),
    "extra argument": (THINK + '<tool_call>{"name": "web_search", "arguments": {"query": "q", "k": 3}}</tool_call>',
                       "unexpected"),
    "wrong argument type": (THINK + '<tool_call>{"name": "web_search", "arguments": {"query": 7}}</tool_call>',
                            "non-empty string"),
    "too many urls": (THINK + '<tool_call>{"name": "browse_webpage", "arguments": {"url_list": ["a","b","c","d"], '
                              '"query": "q"}}</tool_call>', "1 to 3 items"),
    "both actions": (THINK + SEARCH + "<answer>x</answer>", "both a tool call and an answer"),
    "two tool calls": (THINK + SEARCH + SEARCH, "second"),
    "neither action": (THINK, "no action"),
    "empty answer": (THINK + "<answer>  </answer>", "empty <answer>"),
    "atom outside think": ("<OBSERVATION> a </OBSERVATION>" + THINK + SEARCH, "outside <think>"),
    "atom inside answer": (THINK + "<answer><ACTION> x </ACTION></answer>", "inside <answer>"),
    "missing think": (SEARCH, "before any <think>"),
    "second think": (THINK + THINK + SEARCH, "second <think>"),
    "writes a tool response": (THINK + "<tool_response>fake</tool_response>" + SEARCH, "tool_response"),
    "empty string": ("", "missing <think>"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_turn_raises_format_error_naming_the_problem(case):
    text, message = MALFORMED[case]
    with pytest.raises(FormatError, match=re.escape(message)):
        parse_turn(text)


def test_tool_not_offered_by_environment_is_unknown():
    text = THINK + '<tool_call>{"name": "browse_webpage", "arguments": {"url_list": ["u"], "query": "q"}}</tool_call>'
    assert parse_turn(text).tool_call.name == "browse_webpage"
    with pytest.raises(FormatError, match="unknown tool"):
        parse_turn(text, tools=("web_search",))


@pytest.mark.parametrize("junk", [None, 3, b"<think>", "<think>" * 5000, "{" * 100_000,
                                  THINK + "<tool_call>" + "[" * 100_000 + "</tool_call>"])
def test_no_exception_other_than_format_error_escapes(junk):
    try:
        parse_turn(junk)
    except FormatError:
        pass


def test_one_megabyte_turn_parses_in_linear_time():
    atoms = "".join(f"<OBSERVATION> fact {i} </OBSERVATION><ACTION> step {i} </ACTION>" for i in range(16_000))
    text = f"<think>{atoms}</think>" + SEARCH
    assert len(text) > 1_000_000
    start = time.perf_counter()
    turn = parse_turn(text)
    assert time.perf_counter() - start < 10.0   # ~0.3 s idle; a quadratic parse of 1 MB would take minutes
    assert len(turn.atoms) == 32_000
    with pytest.raises(FormatError):  # the same size, malformed at the very end
        parse_turn(text[:-3])


def test_make_turn_requires_exactly_one_action():
    with pytest.raises(ValueError):
        make_turn([], tool_call=None, answer=None)
    with pytest.raises(ValueError):
        make_turn([Atom("bad tag", "x")], answer="y")
    assert isinstance(make_turn([], answer="y"), Turn)


def test_the_tag_vocabulary_is_defined_once_and_everything_else_derives_from_it():
    """atomic_thought's tags reach the toy tokenizer, teacher and judge, the teacher's and the RRM's instructions
    and the report's colours; no other file spells them (a new vocabulary is one edit)."""
    import re
    from pathlib import Path

    import report
    import rrm_reward
    import teacher_data
    import toy_model
    import toy_world
    from atomic_thought import CANONICAL_TAGS, STRUCTURAL_TAGS
    assert tuple(report.TAG_COLORS) == CANONICAL_TAGS
    assert (toy_world.OBSERVATION, toy_world.HYPOTHESIS, toy_world.RISK, toy_world.ACTION) == CANONICAL_TAGS
    for tag in CANONICAL_TAGS:
        assert f"<{tag}>" in teacher_data.TEACHER_INSTRUCTIONS and tag in rrm_reward.JUDGE_INSTRUCTIONS
        assert {f"<{tag}>", f"</{tag}>", f" </{tag}>\n"} <= set(toy_model.FORMAT_TOKENS + toy_model.LAYOUT_TOKENS)
    assert {f"<{t}>" for t in STRUCTURAL_TAGS} <= set(toy_model.FORMAT_TOKENS)
    root = Path(__file__).resolve().parent.parent
    spelled = [p.name for p in sorted(root.glob("*.py")) if p.name != "atomic_thought.py" and re.search(
        r"[\"'<](OBSERVATION|HYPOTHESIS_TESTING|RISK_ANALYSIS)[\"'>]", p.read_text().split('if __name__ == "__main__"')[0])]
    assert spelled == [], spelled   # a module's runnable demo (its __main__ block) may spell an example
