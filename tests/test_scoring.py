"""Unit tests of answer normalisation, EM, token F1 and generation cleaning."""

from __future__ import annotations

import pytest

from eval_and_metrics.scoring import clean_generation, exact_match, normalize_answer, token_f1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  a   cat,  an APPLE!  ", "cat apple"),
        ("Theatre", "theatre"),  # "the" only as a whole word
        ("anthem of a nation", "anthem of nation"),
        ("4.2 km", "42 km"),  # SQuAD drops punctuation, decimals included, on both sides alike
        ("QX-4.1", "qx41"),
        ("", ""),
        ("the a an", ""),
        ("Hello,\tworld\n", "hello world"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match() -> None:
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("", "") == 1.0
    assert exact_match("", "Paris") == 0.0
    assert exact_match("the", "") == 1.0  # both normalise to ""
    assert isinstance(exact_match("a", "b"), float)


def test_token_f1_hand_computed() -> None:
    # pred tokens: [new, york, city], gold: [new, york]: common 2, P = 2/3, R = 1, F1 = 0.8
    assert token_f1("New York City", "New York") == pytest.approx(0.8)
    # articles and punctuation vanish before tokenising
    assert token_f1("The New-York.", "new york") == pytest.approx(0.0)  # "newyork" vs "new york"
    assert token_f1("the new york", "New York!") == pytest.approx(1.0)
    # multiset: pred [x, x, y], gold [x, z]: common 1, P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 0.4
    assert token_f1("x x y", "x z") == pytest.approx(0.4)
    assert token_f1("red", "blue") == 0.0


def test_token_f1_empty() -> None:
    assert token_f1("", "") == 1.0
    assert token_f1("the", "an") == 1.0  # both empty after normalisation
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "") == 0.0
    assert token_f1("...", "Paris") == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Paris. It is the capital.", "Paris"),
        (" Paris\nQuestion: what", "Paris"),
        (" Paris.\nNext", "Paris"),
        (" Paris.", "Paris"),  # final "." at the end of the string
        (" 4.2 km. Then it grew.", "4.2 km"),  # decimal kept, sentence end cut
        (" 4.2 km", "4.2 km"),
        (" QX-4.1 was its code", "QX-4.1 was its code"),
        (" QX-4.1.", "QX-4.1"),
        (" version 1.2.3. Later", "version 1.2.3"),
        ("\n\nParis\n", "Paris"),  # leading newlines are not the cut
        ("", ""),
        ("   ", ""),
        ("\n", ""),
        (".", ""),
        (" Paris and Lyon", "Paris and Lyon"),  # no terminator: whole continuation
        (" 3.\n", "3"),
    ],
)
def test_clean_generation(text: str, expected: str) -> None:
    assert clean_generation(text) == expected


def test_clean_generation_strips_prompt() -> None:
    prompt = "In 2021, the mayor of Foo was"
    assert clean_generation(prompt + " Ann Lee. Then", prompt=prompt) == "Ann Lee"
    # a continuation that does not start with the prompt is taken as is
    assert clean_generation(" Ann Lee.", prompt=prompt) == "Ann Lee"


def test_clean_then_score() -> None:
    assert exact_match(clean_generation(" the 4.2 km.\nmore"), "4.2 km") == 1.0
    assert exact_match(clean_generation(" 4.2 km"), "42 km") == 1.0  # known SQuAD collapse
