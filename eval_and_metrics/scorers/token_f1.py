"""token_f1: greedy answer, cut like exact_match, SQuAD token F1 against the target (partial credit)."""

from __future__ import annotations

from typing import ClassVar

from data.streams.schema import EvalItem
from eval_and_metrics.scorers.base import GenerationScorer, Row
from eval_and_metrics.scorers.exact_match import answer_span_closed
from eval_and_metrics.scoring import clean_generation, token_f1


class TokenF1(GenerationScorer):
    name: ClassVar[str] = "token_f1"
    metrics: ClassVar[dict[str, bool]] = {"token_f1": True}
    default_max_new_tokens: ClassVar[int] = 32

    def is_done(self, item: EvalItem, generation: str) -> bool:
        return answer_span_closed(generation)

    def score_generation(self, item: EvalItem, generation: str) -> Row:
        prediction = clean_generation(generation)
        return {"prediction": prediction, "generation": generation, "target": item.target,
                "token_f1": token_f1(prediction, item.target)}
