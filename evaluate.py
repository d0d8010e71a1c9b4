"""Answer metrics (done) and, in a later issue, the benchmark evaluation loop.

Status: this file holds the answer metrics shared by training and evaluation: `normalize_answer`,
`f1_score` and `exact_match`. The evaluation command (`python evaluate.py ...`: benchmark loading, the
greedy evaluation loop and the report, PAPER.md §5) is NOT written yet; it comes with the evaluation issue.
Running this file today only prints a few example scores.

The outcome reward (PAPER.md §3, DeepResearcher's reward that Atom-Searcher inherits) is word-level
**F1 over token sets** between the normalized prediction and each golden answer, maximised over the
golden answers:

    normalize(s) = collapse_whitespace(replace_punctuation_by_space(lower(s)))
    P = |pred ∩ gold| / |pred|,  R = |pred ∩ gold| / |gold|,  F1 = 2PR / (P + R)   (sets of tokens)
    f1_score(pred, golds) = max over gold in golds of F1(pred, gold)

Set F1, not SQuAD's multiset (Counter) F1, and no removal of articles: this matches DeepResearcher's
`format_and_f1.py` reward so our numbers are comparable with the paper's tables. The two differ only when
a token repeats ("new new york" vs "new york": set F1 1.0, multiset F1 0.8).

Edge cases, decided here once for training and evaluation:
1. An empty prediction (None, "", or one that normalizes to nothing such as "?!") scores 0 for F1 and EM,
   whatever the golden answers are: an empty answer must never earn reward.
2. An empty golden list is a data error: ValueError (not a silent 0 that would hide a broken dataset).
   A golden answer that normalizes to nothing (e.g. "...") matches nothing.
3. Punctuation is every character whose Unicode category starts with "P" (“ ” ‘ ’ « » — … ¿ ...)
   **and also "S" (symbols: $ + < = > ^ ` | ~ € ° © ™ emoji)**, our choice: on ASCII, P ∪ S is exactly
   Python's `string.punctuation`, which DeepResearcher replaces, so ASCII behaviour is identical to theirs,
   and non-ASCII symbols are treated the same way ("100°C" -> "100 c", "€5" -> "5").
4. Unicode text is NFKC-normalized (our choice): composed/decomposed accents and full-width forms compare
   equal ("Ｔｏｋｙｏ" == "tokyo"); symbols are replaced before NFKC too, so "™" never becomes "tm".
   Accents are kept: "Zürich" != "Zurich". Lower-casing is `str.lower` (as DeepResearcher), not casefold.
5. yes/no: no special case (as DeepResearcher; HotpotQA's official script zeroes F1 when a yes/no answer
   differs). "yes" vs "no" -> 0; "yes, he did" vs "yes" -> F1 = 2·(1/3)·1/(1/3 + 1) = 0.5.
6. Hyphens and apostrophes are punctuation, so "Jean-Luc" -> "jean luc" and "O'Brien" -> "o brien";
   digits stay ("1,000" -> "1 000").
7. Types: golden answers must be a non-empty list/tuple of strings (a bare string is rejected rather than
   read as a list of characters); the prediction must be a string or None.
"""
from __future__ import annotations

import unicodedata


def _is_punctuation(ch: str) -> bool:
    """Unicode punctuation (P*) or symbol (S*): edge case 3 of the module docstring."""
    return unicodedata.category(ch)[0] in "PS"


def normalize_answer(text: str) -> str:
    """Lower-case, every punctuation/symbol character -> space, collapse whitespace (PAPER.md §3)."""
    if not isinstance(text, str):
        raise TypeError(f"answer must be a string, got {type(text).__name__}")
    # Symbols go before NFKC (which would spell "™" as "TM") and again after it (it spells "…" as "...").
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if _is_punctuation(ch) else ch for ch in text)
    return " ".join(text.split())          # str.split() splits on any Unicode whitespace


def _check_inputs(prediction, golden_answers) -> None:
    if prediction is not None and not isinstance(prediction, str):
        raise TypeError(f"prediction must be a string or None, got {type(prediction).__name__}")
    if isinstance(golden_answers, str) or not isinstance(golden_answers, (list, tuple)):
        raise TypeError(f"golden_answers must be a list of strings, got {type(golden_answers).__name__}"
                        + (" (wrap a single answer in a list)" if isinstance(golden_answers, str) else ""))
    if not golden_answers:
        raise ValueError("golden_answers is empty: every question needs at least one golden answer")
    bad = [g for g in golden_answers if not isinstance(g, str)]
    if bad:
        raise TypeError(f"golden_answers must all be strings, got {bad[:3]!r}")


def _set_f1(pred_tokens: set[str], gold_tokens: set[str]) -> float:
    common = len(pred_tokens & gold_tokens)
    if common == 0:                         # also covers an empty gold set
        return 0.0
    precision = common / len(pred_tokens)   # P = |pred ∩ gold| / |pred|
    recall = common / len(gold_tokens)      # R = |pred ∩ gold| / |gold|
    return 2 * precision * recall / (precision + recall)   # F1 = 2PR / (P + R)


def f1_score(prediction: str | None, golden_answers: list[str]) -> float:
    """Token-set F1 of `prediction` against the best-matching golden answer, in [0, 1]."""
    _check_inputs(prediction, golden_answers)
    pred_tokens = set(normalize_answer(prediction).split()) if prediction is not None else set()
    if not pred_tokens:
        return 0.0                          # edge case 1: an empty answer earns nothing
    return max(_set_f1(pred_tokens, set(normalize_answer(g).split())) for g in golden_answers)


def exact_match(prediction: str | None, golden_answers: list[str]) -> float:
    """1.0 if the normalized prediction equals any normalized golden answer, else 0.0."""
    _check_inputs(prediction, golden_answers)
    pred = normalize_answer(prediction) if prediction is not None else ""
    if not pred:
        return 0.0                          # edge case 1 (an empty gold cannot make "" a match)
    return float(any(pred == normalize_answer(g) for g in golden_answers))


if __name__ == "__main__":
    examples = [("Paris", ["Paris, France"]), ("the Eiffel Tower", ["Eiffel Tower"]),
                ("yes, he did", ["yes"]), ("new new york", ["New York"]), ("?!", ["Paris"])]
    print(f"{'prediction':<20} {'golden':<18} {'F1':>6} {'EM':>4}")
    for pred, golds in examples:
        print(f"{pred!r:<20} {golds!r:<18} {f1_score(pred, golds):>6.3f} {exact_match(pred, golds):>4.1f}")
    print("(the benchmark evaluation command comes in a later issue; see the module docstring)")
