"""The generate_until scorers' rows and answer regions without a model: what each row holds (the keys the
report and re-aggregation read), where rouge_l's response and numeric's answer region end, and the check
messages. The mutation run of the scorers (docs/mutation.md, module scorers_text) found them untested."""

from __future__ import annotations

import pytest

from data.streams.schema import EvalItem
from eval_and_metrics.scorers import SCORERS
from eval_and_metrics.scorers.numeric import answer_region, to_decimal
from eval_and_metrics.scorers.rouge_l import response, rouge_l_f


def test_rouge_l_response_ends_at_the_first_blank_line() -> None:
    assert response("  first answer\n\nsecond\n\nthird") == "first answer"
    assert response("\n\n  lead blank lines are dropped first\n\nrest") == "lead blank lines are dropped first"
    assert response("one line\nand another") == "one line\nand another"


def test_numeric_answer_region_ends_at_the_first_stop_sequence() -> None:
    assert answer_region("x = 3\nQuestion: y\nQuestion: z") == "x = 3\n"
    assert answer_region("no stop") == "no stop"
    assert to_decimal("") is None and to_decimal("abc") is None and to_decimal("72.0") == to_decimal("72")


@pytest.mark.parametrize(("name", "target", "generation", "row"), [
    ("exact_match", "Paris", " Paris. More text",
     {"prediction": "Paris", "generation": " Paris. More text", "target": "Paris", "exact_match": 1.0}),
    ("token_f1", "the big cat", "big dog\n",
     {"prediction": "big dog", "generation": "big dog\n", "target": "the big cat", "token_f1": 0.5}),
    ("numeric", "#### 1,200", "so 1200.\n#### 1200\n",
     {"prediction": "1200", "generation": "so 1200.\n#### 1200\n", "target": "1200", "numeric_match": 1.0}),
    ("rouge_l", "hello there", " hello there\n\nbye",
     {"prediction": "hello there", "generation": " hello there\n\nbye", "target": "hello there", "rouge_l": 1.0}),
])
def test_each_row_holds_the_prediction_the_generation_the_target_and_the_metric(name, target, generation, row) -> None:
    scorer = SCORERS[name]()
    item = EvalItem("i1", "Q:", target)
    got = scorer.score_generation(item, generation)
    assert got == pytest.approx(row)
    assert scorer.aggregate([{"id": "i1", **got}]) == pytest.approx({m: row[m] for m in scorer.metrics})


def test_rouge_l_of_a_partial_answer() -> None:
    # LCS "the cat" of 3 and 4 tokens: P = 2/3, R = 2/4, F = 2PR / (P + R)
    p, r = 2 / 3, 2 / 4
    assert rouge_l_f("the cat sat", "the black cat ran") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l_f("", "anything") == 0.0


def test_a_numeric_target_without_a_number_is_named_in_its_first_60_characters() -> None:
    target = "no digits here, only words " * 5
    problems = SCORERS["numeric"]().check([EvalItem("n1", "Q:", target)])
    assert problems == [f"numeric: item 'n1': target {target[:60]!r} holds no number to compare with"]
    assert SCORERS["numeric"]().check([EvalItem("n2", "", "42")]) == [
        "numeric: item 'n2': prompt is empty: a generate_until item continues its prompt"]


def test_rouge_l_is_done_once_a_blank_line_follows_the_answer_not_before_it() -> None:
    scorer, item = SCORERS["rouge_l"](), EvalItem("r", "Q:", "hello")
    assert scorer.is_done(item, "hello\n\n")  # the response is closed: more tokens cannot change it
    assert not scorer.is_done(item, "\n\nhello")  # leading blank lines are dropped, the answer is still open
    assert not scorer.is_done(item, "hello\n")
