"""Answer metrics: SQuAD normalisation, EM/F1, final-answer parsing, containment, quotes."""

from __future__ import annotations

import pytest

from raft_dist.data.answers import ANSWER_TAG, BEGIN_QUOTE, END_QUOTE
from raft_dist.evaluation.metrics import (
    ExampleScore,
    aggregate,
    answer_tokens,
    contains_answer,
    exact_match,
    f1_score,
    final_answer,
    follows_format,
    normalize_answer,
    quote_fidelity,
    quote_spans,
    score_example,
)


def quoted(text: str) -> str:
    return f"{BEGIN_QUOTE}{text}{END_QUOTE}"


ORACLE = "The harbour master listens on channel 14.\nShips report before entering."
DISTRACTOR = "The lighthouse was built in 1990 by the coast guard."


def make_score(
    *,
    em: float | None = 1.0,
    f1: float = 1.0,
    contained: bool = True,
    fmt: bool | None = True,
    quotes: int = 0,
    verbatim: int = 0,
    oracle: int = 0,
) -> ExampleScore:
    return ExampleScore(
        em=em,
        f1=f1,
        contained=contained,
        follows_format=fmt,
        quotes=quotes,
        quotes_verbatim=verbatim,
        quotes_from_oracle=oracle,
    )


# normalisation


def test_normalize_removes_ascii_punctuation_and_lowercases() -> None:
    assert normalize_answer("Hello, World!") == "hello world"
    assert normalize_answer("U.S.A.") == "usa"
    assert normalize_answer("$5 + tax") == "5 tax"


def test_normalize_removes_articles_only_as_whole_words() -> None:
    assert normalize_answer("The Theatre") == "theatre"
    assert normalize_answer("an anthem and a banana") == "anthem and banana"
    assert normalize_answer("Then there") == "then there"


def test_normalize_removes_unicode_punctuation() -> None:
    assert normalize_answer("\u201cParis\u201d \u2014 France\u2026") == "paris france"
    assert normalize_answer("\u00bfQu\u00e9?") == "qu\u00e9"


def test_normalize_collapses_whitespace() -> None:
    assert normalize_answer("  big \t\n  red   dog  ") == "big red dog"
    assert normalize_answer("") == ""
    assert answer_tokens("The big, red dog.") == ["big", "red", "dog"]


# exact match and F1


def test_exact_match_ignores_case_punctuation_articles() -> None:
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "eiffel tower") == 0.0


def test_f1_partial_overlap() -> None:
    # "the" is dropped: pred [cat, sat], gold [cat, sat, down]: P = 1, R = 2/3.
    assert f1_score("the cat sat", "cat sat down") == pytest.approx(0.8)


def test_f1_disjoint_is_zero() -> None:
    assert f1_score("red", "blue") == 0.0


def test_f1_counts_repeated_tokens_as_multiset() -> None:
    # Only one "x" of the prediction matches: P = 2/3, R = 1.
    assert f1_score("x x y", "x y") == pytest.approx(0.8)
    assert f1_score("x y", "x y") == 1.0
    # Both "x" match both "x": overlap 2, P = R = 2/3 (a set overlap would give 1/3).
    assert f1_score("x x y", "x x z") == pytest.approx(2 / 3)
    # A prediction token counts only as often as the gold has it: overlap 1, P = 1/3, R = 1.
    assert f1_score("x x x", "x") == pytest.approx(0.5)


def test_f1_empty_answers() -> None:
    assert f1_score("", "the") == 1.0  # both empty after normalisation
    assert f1_score("", "cat") == 0.0
    assert f1_score("cat", "!!") == 0.0


# final answer and format


def test_final_answer_missing_tag() -> None:
    assert final_answer("The answer is Paris.") == ""
    assert not follows_format("The answer is Paris.")


def test_final_answer_uses_last_tag_and_stops_at_line_end() -> None:
    assert final_answer(f"x {ANSWER_TAG} a\n{ANSWER_TAG} b\nmore") == "b"


def test_final_answer_at_end_without_newline() -> None:
    assert final_answer(f"reasoning {ANSWER_TAG}  Paris ") == "Paris"
    assert follows_format(f"reasoning {ANSWER_TAG}  Paris ")


def test_final_answer_empty_after_tag() -> None:
    assert final_answer(f"{ANSWER_TAG}\nfoo") == ""
    assert final_answer(f"text {ANSWER_TAG}   ") == ""
    assert not follows_format(f"{ANSWER_TAG}\nfoo")


# containment


def test_contains_is_token_level_not_substring() -> None:
    assert not contains_answer("built in 1990", "1")
    assert contains_answer("built in 1990", "1990")


def test_contains_multi_token_contiguous() -> None:
    assert contains_answer("call on Channel 14, then wait", "channel 14")
    assert not contains_answer("channel 9 or 14", "channel 14")


def test_contains_ignores_punctuation_and_case() -> None:
    assert contains_answer("It is PARIS!", "Paris.")


def test_contains_answer_next_to_format_markers() -> None:
    assert contains_answer(f"{quoted('Paris')} so {ANSWER_TAG}Paris", "paris")
    assert contains_answer(f"{ANSWER_TAG}Paris", "paris")


def test_contains_empty_gold_is_false() -> None:
    assert not contains_answer("anything at all", "")
    assert not contains_answer("anything at all", "the")


# quote fidelity


def test_quote_spans_ignore_unclosed_quote() -> None:
    output = f"{quoted('one')} and {BEGIN_QUOTE}two never closed"
    assert quote_spans(output) == ["one"]


def test_quote_verbatim_from_oracle() -> None:
    output = f"{quoted('listens on channel 14')} {ANSWER_TAG} channel 14"
    assert quote_fidelity(output, [DISTRACTOR, ORACLE], ORACLE) == (1, 1, 1)


def test_quote_with_different_whitespace_is_still_verbatim() -> None:
    output = quoted("listens on   channel\n14.\n Ships report")
    assert quote_fidelity(output, [ORACLE], ORACLE) == (1, 1, 1)


def test_quote_is_case_sensitive_and_must_be_in_a_document() -> None:
    output = quoted("LISTENS on channel 14") + quoted("the harbour is closed")
    assert quote_fidelity(output, [DISTRACTOR, ORACLE], ORACLE) == (2, 0, 0)


def test_quote_from_distractor_is_verbatim_but_not_oracle() -> None:
    output = quoted("built in 1990")
    assert quote_fidelity(output, [DISTRACTOR, ORACLE], ORACLE) == (1, 1, 0)


def test_empty_quote_counts_but_is_not_verbatim() -> None:
    output = quoted("  ") + quoted("channel 14")
    assert quote_fidelity(output, [ORACLE], ORACLE) == (2, 1, 1)


def test_quote_without_oracle() -> None:
    output = quoted("channel 14")
    assert quote_fidelity(output, [ORACLE], None) == (1, 1, 0)


# score_example


def test_score_example_answer_only() -> None:
    output = (
        f"{quoted('listens on channel 14')} {quoted('built in 1990')} {quoted('made up')}\n"
        f"So: {ANSWER_TAG} Channel 14.\n"
    )
    score = score_example(
        output, "channel 14", documents=[DISTRACTOR, ORACLE], oracle=ORACLE, answer_only=True
    )
    assert score == make_score(
        em=1.0, f1=1.0, contained=True, fmt=True, quotes=3, verbatim=2, oracle=1
    )


def test_score_example_answer_only_without_tag() -> None:
    score = score_example("It is channel 14, I think.", "channel 14")
    assert score.em == 0.0
    assert score.f1 == 0.0
    assert score.contained is True
    assert score.follows_format is False


def test_score_example_without_documents_has_no_quotes() -> None:
    score = score_example(f"{quoted('anything')} {ANSWER_TAG} b", "b")
    assert (score.quotes, score.quotes_verbatim, score.quotes_from_oracle) == (0, 0, 0)


def test_score_example_whole_completion() -> None:
    # Whole-output tokens [cat, sat, here, answer, dog] vs [cat, sat, down]: P = 2/5, R = 2/3.
    output = f"Cat sat here.\n{ANSWER_TAG} dog"
    score = score_example(output, "cat sat down", answer_only=False)
    assert score.em is None
    assert score.follows_format is None
    assert score.f1 == pytest.approx(0.5)
    assert score.contained is False
    assert score_example(output, "sat here", answer_only=False).contained is True


def test_score_example_whole_completion_has_no_quote_numbers() -> None:
    output = f"{quoted('channel 14')} so channel 14"
    score = score_example(output, output, documents=[ORACLE], oracle=ORACLE, answer_only=False)
    assert (score.quotes, score.quotes_verbatim, score.quotes_from_oracle) == (0, 0, 0)


def test_score_as_dict() -> None:
    score = make_score(em=None, f1=0.5, contained=False, fmt=None, quotes=2, verbatim=1)
    assert score.as_dict() == {
        "em": None,
        "f1": 0.5,
        "contained": False,
        "follows_format": None,
        "quotes": 2,
        "quotes_verbatim": 1,
        "quotes_from_oracle": 0,
    }


# aggregate


def test_aggregate_means_and_shares() -> None:
    scores = [
        make_score(em=1.0, f1=1.0, contained=True, fmt=True, quotes=2, verbatim=2, oracle=1),
        make_score(em=0.0, f1=0.5, contained=False, fmt=False, quotes=2, verbatim=1, oracle=0),
    ]
    assert aggregate(scores) == {
        "n": 2,
        "em": 0.5,
        "f1": 0.75,
        "contained": 0.5,
        "follows_format": 0.5,
        "quotes": 4,
        "quote_verbatim": 0.75,
        "quote_from_oracle": 0.25,
    }


def test_aggregate_skips_none_and_handles_no_quotes() -> None:
    scores = [
        make_score(em=None, f1=0.2, contained=True, fmt=None),
        make_score(em=None, f1=0.4, contained=True, fmt=None),
        make_score(em=None, f1=0.6, contained=False, fmt=None),
    ]
    result = aggregate(scores)
    assert result["n"] == 3
    assert result["em"] is None
    assert result["follows_format"] is None
    assert result["f1"] == pytest.approx(0.4)
    assert result["contained"] == pytest.approx(2 / 3)
    assert result["quotes"] == 0
    assert result["quote_verbatim"] is None
    assert result["quote_from_oracle"] is None


def test_aggregate_mixed_none_uses_only_defined_values() -> None:
    scores = [make_score(em=1.0, fmt=True), make_score(em=None, fmt=None)]
    result = aggregate(scores)
    assert result["em"] == 1.0
    assert result["follows_format"] == 1.0


def test_aggregate_empty() -> None:
    result = aggregate([])
    assert result["n"] == 0
    assert all(value is None for key, value in result.items() if key != "n")
    assert set(result) == {
        "n",
        "em",
        "f1",
        "contained",
        "follows_format",
        "quotes",
        "quote_verbatim",
        "quote_from_oracle",
    }
