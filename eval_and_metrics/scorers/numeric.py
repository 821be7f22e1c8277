"""numeric: greedy solution, its final number compared numerically with the gold number (GSM8K).

The prediction is the number after GSM8K's "#### " marker if the generation has one (lm-eval's
strict-match), else the last number in the generation (lm-eval's flexible-extract); the
generation is read up to "Question:", lm-eval's stop sequence for gsm8k, so a model that goes on
to invent the next few-shot question is not scored on that question's numbers. What a number is
(commas between digit groups, "$", a trailing "." that ends a sentence, ...) is data/numbers.py's
grammar, the one the stream loader accepted the gold target by, so the gold is scored as exactly
the number the loader accepted. Prediction and gold are compared as exact decimals: "72", "72.0"
and "$72." are all 72.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import ClassVar

from data.numbers import FINAL_RE, final_number
from data.streams.schema import EvalItem
from eval_and_metrics.scorers.base import GenerationScorer, Row, prompt_problems

STOP_SEQUENCE = "Question:"


def answer_region(generation: str) -> str:
    """The generation up to the stop sequence."""
    return generation.split(STOP_SEQUENCE, 1)[0]


def extract_number(generation: str) -> str:
    """The final number of a generation as a plain decimal string, "" when it has none."""
    return final_number(answer_region(generation))


def to_decimal(number: str) -> Decimal | None:
    try:
        return Decimal(number) if number else None
    except InvalidOperation:
        return None


def numbers_equal(prediction: str, gold: str) -> bool:
    """Exact decimal equality; a missing or unparsable number is never equal."""
    a, b = to_decimal(prediction), to_decimal(gold)
    return a is not None and b is not None and a == b


def number_closed(generation: str) -> bool:
    """True once the prediction cannot change: the stop sequence is there, or a "#### n" line ended."""
    if STOP_SEQUENCE in generation:
        return True
    final = FINAL_RE.search(generation)
    return final is not None and "\n" in generation[final.end() :]


class Numeric(GenerationScorer):
    name: ClassVar[str] = "numeric"
    metrics: ClassVar[dict[str, bool]] = {"numeric_match": True}
    default_max_new_tokens: ClassVar[int] = 256  # a GSM8K solution is a few short lines

    def check_item(self, item: EvalItem) -> list[str]:
        problems = prompt_problems(item)
        if not extract_number(item.target):
            problems.append(f"target {item.target[:60]!r} holds no number to compare with")
        return problems

    def is_done(self, item: EvalItem, generation: str) -> bool:
        return number_closed(generation)

    def score_generation(self, item: EvalItem, generation: str) -> Row:
        prediction = extract_number(generation)
        gold = extract_number(item.target)
        return {
            "prediction": prediction,
            "generation": generation,
            "target": gold,
            "numeric_match": float(numbers_equal(prediction, gold)),
        }
