"""Tests of the answer metrics (curriculum.py, the outcome reward): hand-computed set-F1 / EM, both normalizations,
every documented edge case."""
import re
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curriculum import NORMALIZATIONS, exact_match, f1_score, normalize_answer


# ---- normalize_answer -----------------------------------------------------------------------------

def deepresearcher_preprocess(text: str) -> str:
    """DeepResearcher's normalization as its verl/utils/reward_score/format_and_f1.py writes it (compute_score
    lower-cases first, preprocess_text replaces each string.punctuation character, then collapses \\s+ and strips),
    written out here as the independent reference the default must equal."""
    text = text.lower()
    for punct in string.punctuation:
        text = text.replace(punct, " ")
    return re.sub(r"\s+", " ", text).strip()


# (raw, DeepResearcher's normalization = the default, the "unicode" variant)
CASES = [
    ("Paris", "paris", "paris"),
    ("  The   Eiffel\tTower \n", "the eiffel tower", "the eiffel tower"),   # articles are kept (set F1)
    ("Jean-Luc Picard", "jean luc picard", "jean luc picard"),              # hyphen -> space
    ("O'Brien", "o brien", "o brien"),
    ("1,000", "1 000", "1 000"),
    ("U.S.A.", "u s a", "u s a"),
    ("?!...", "", ""),                                                       # punctuation only -> empty
    ("", "", ""),
    ("$5 + 3 = 8 | x ~ y ^ z `q` <a>", "5 3 8 x y z q a", "5 3 8 x y z q a"),   # ASCII symbols: string.punctuation
    ("“Dune” — «Herbert»… ¿sí?", "“dune” — «herbert»… ¿sí", "dune herbert sí"),  # Unicode punctuation (P*)
    ("1979–80", "1979–80", "1979 80"),                                       # an en dash: one word, or two
    ("O’Neil", "o’neil", "o neil"),                                          # a curly apostrophe
    ("€5 100°C © Coca-Cola™ 🙂", "€5 100°c © coca cola™ 🙂", "5 100 c coca cola"),   # non-ASCII symbols (S*)
    ("🙂🙂", "🙂🙂", ""),                                                   # an answer of emoji
    ("Ｔｏｋｙｏ", "ｔｏｋｙｏ", "tokyo"),                                     # full-width forms: NFKC only
    ("ﬁsh", "ﬁsh", "fish"),                                                 # a compatibility ligature: NFKC only
    ("Zürich", "zürich", "zürich"),                                          # accents are kept by both
    ("a\u00a0b\u2003c", "a b c", "a b c"),                                  # Unicode whitespace collapses
]


@pytest.mark.parametrize("raw,deepresearcher,unicode_variant", CASES)
def test_normalize_answer_both_variants(raw, deepresearcher, unicode_variant):
    assert normalize_answer(raw) == deepresearcher == deepresearcher_preprocess(raw)
    assert normalize_answer(raw, "unicode") == unicode_variant


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_the_default_is_exactly_deepresearchers_normalization(text):
    assert normalize_answer(text) == deepresearcher_preprocess(text)


def test_the_variants_differ_in_f1_where_documented():
    assert f1_score("1979–80", ["1979"]) == 0.0 and f1_score("1979–80", ["1979"], "unicode") == pytest.approx(2 / 3)
    assert f1_score("🙂", ["🙂"]) == 1.0 and f1_score("🙂", ["🙂"], "unicode") == 0.0   # nothing left to score
    assert exact_match("Ｔｏｋｙｏ", ["Tokyo"]) == 0.0 and exact_match("Ｔｏｋｙｏ", ["Tokyo"], "unicode") == 1.0
    with pytest.raises(ValueError, match="unknown normalization 'ascii'"):
        f1_score("a", ["a"], "ascii")


def test_every_ascii_punctuation_character_becomes_space():
    # P ∪ S on ASCII is exactly string.punctuation, so both variants agree on ASCII.
    for how in NORMALIZATIONS:
        for ch in string.punctuation:
            assert normalize_answer(f"a{ch}b", how) == "a b", ch
        for ch in string.ascii_letters + string.digits:
            assert normalize_answer(f"a{ch}b", how) == f"a{ch.lower()}b"


def test_composed_and_decomposed_accents_are_equal_under_unicode():
    assert normalize_answer("e\u0301te\u0301", "unicode") == normalize_answer("\u00e9t\u00e9", "unicode")
    assert normalize_answer("e\u0301te\u0301") != normalize_answer("\u00e9t\u00e9")   # DeepResearcher's: no NFKC


def test_normalize_rejects_non_strings():
    with pytest.raises(TypeError, match="answer must be a string, got int"):
        normalize_answer(42)


# ---- f1_score: hand-computed --------------------------------------------------------------------

@pytest.mark.parametrize("pred,golds,expected", [
    ("Paris", ["Paris"], 1.0),
    ("paris.", ["PARIS"], 1.0),
    # pred {paris}, gold {paris, france}: P = 1, R = 1/2 -> F1 = 2·1·½ / 1½ = 2/3
    ("Paris", ["Paris, France"], 2 / 3),
    # pred {the, eiffel, tower}, gold {eiffel, tower}: P = 2/3, R = 1 -> F1 = 0.8
    ("the Eiffel Tower", ["Eiffel Tower"], 0.8),
    # pred {a, b, c}, gold {b, c, d, e}: common 2, P = 2/3, R = 1/2 -> F1 = 2·(1/3)/(7/6) = 4/7
    ("a b c", ["b c d e"], 4 / 7),
    ("London", ["Paris"], 0.0),
    # max over golden answers: 0, 2/3, 1
    ("Paris", ["London", "Paris France", "paris"], 1.0),
    ("Paris", ["London", "Paris France"], 2 / 3),
])
def test_f1_hand_computed(pred, golds, expected):
    assert f1_score(pred, golds) == pytest.approx(expected)


def test_f1_is_set_f1_not_multiset():
    # Sets: pred {new, york} == gold {new, york} -> 1.0. SQuAD's Counter F1 would give
    # P = 2/3, R = 1 -> 0.8, and that is exactly what we do NOT compute (DeepResearcher's set F1).
    assert f1_score("new new york", ["New York"]) == 1.0
    assert f1_score("New York", ["new york new york"]) == 1.0
    # Repeating a wrong token does not lower the score either.
    assert f1_score("york york york x", ["york"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_f1_yes_no_has_no_special_case():
    assert f1_score("yes", ["no"]) == 0.0
    assert f1_score("Yes.", ["yes"]) == 1.0
    # {yes, he, did} vs {yes}: P = 1/3, R = 1 -> 0.5 (HotpotQA's official script would say 0).
    assert f1_score("yes, he did", ["yes"]) == pytest.approx(0.5)


@pytest.mark.parametrize("pred", ["", "   ", "?!", "…", None])
def test_empty_prediction_scores_zero(pred):
    assert f1_score(pred, ["Paris"]) == 0.0
    assert exact_match(pred, ["Paris"]) == 0.0
    # ... even when a golden answer itself normalizes to empty: no reward for saying nothing.
    assert f1_score(pred, ["..."]) == 0.0
    assert exact_match(pred, ["...", ""]) == 0.0


def test_golden_answer_that_normalizes_to_empty_matches_nothing():
    assert f1_score("Paris", ["!!!"]) == 0.0
    assert f1_score("Paris", ["!!!", "Paris"]) == 1.0
    assert exact_match("Paris", ["!!!"]) == 0.0


def test_unicode_and_symbol_cases():
    assert f1_score("“Tokyo”", ["Ｔｏｋｙｏ"], "unicode") == 1.0
    for how in NORMALIZATIONS:
        assert exact_match("Zurich", ["Zürich"], how) == 0.0   # accents are not stripped
    assert f1_score("100°C", ["100 C"], "unicode") == 1.0 and f1_score("100°C", ["100 C"]) == 0.0
    assert f1_score("€5", ["5"], "unicode") == 1.0 and f1_score("€5", ["5"]) == 0.0


def test_scores_are_floats_in_unit_interval():
    for pred, golds in [("a", ["a"]), ("a b", ["b c"]), ("x", ["y"]), ("", ["y"])]:
        for fn in (f1_score, exact_match):
            v = fn(pred, golds)
            assert isinstance(v, float) and 0.0 <= v <= 1.0


# ---- exact_match ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred,golds,expected", [
    ("Paris", ["paris"], 1.0),
    ("  PARIS!! ", ["Paris"], 1.0),
    ("The Paris", ["Paris"], 0.0),            # articles count (no SQuAD article removal)
    ("Paris France", ["Paris"], 0.0),
    ("Paris", ["London", "paris."], 1.0),     # any golden answer
    ("new new york", ["new york"], 0.0),      # EM compares strings, not sets
    ("Jean-Luc", ["jean luc"], 1.0),
])
def test_exact_match(pred, golds, expected):
    assert exact_match(pred, golds) == expected


# ---- bad inputs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [f1_score, exact_match])
def test_empty_golden_list_is_a_data_error(fn):
    with pytest.raises(ValueError, match="golden_answers is empty"):
        fn("Paris", [])


@pytest.mark.parametrize("fn", [f1_score, exact_match])
@pytest.mark.parametrize("golds,match", [
    ("Paris", "wrap a single answer in a list"),
    (None, "golden_answers must be a list of strings, got NoneType"),
    (["Paris", 3], r"golden_answers must all be strings, got \[3\]"),
])
def test_bad_golden_answers(fn, golds, match):
    with pytest.raises(TypeError, match=match):
        fn("Paris", golds)


@pytest.mark.parametrize("fn", [f1_score, exact_match])
def test_bad_prediction_type(fn):
    with pytest.raises(TypeError, match="prediction must be a string or None, got list"):
        fn(["Paris"], ["Paris"])
