"""exact_match: greedy answer, cut to its first line / sentence, SQuAD-normalised string equality.

The answer span and the normalisation are eval_and_metrics/scoring.py's, the same ones the
temporal-facts probes use, so a stream task and a probe read the same way.
"""

from __future__ import annotations

import re
from typing import ClassVar

from data.streams.schema import EvalItem
from eval_and_metrics.scorers.base import GenerationScorer, Row
from eval_and_metrics.scoring import clean_generation, exact_match

# clean_generation cuts at the first newline or at a "." followed by whitespace, after dropping
# leading whitespace; once either is in the text, more tokens cannot change the answer span.
_SPAN_CLOSED = re.compile(r"\n|\.\s")


def answer_span_closed(generation: str) -> bool:
    """True once clean_generation's cut point is in the text (more tokens cannot move it)."""
    return _SPAN_CLOSED.search(generation.lstrip()) is not None


class ExactMatch(GenerationScorer):
    name: ClassVar[str] = "exact_match"
    metrics: ClassVar[dict[str, bool]] = {"exact_match": True}
    default_max_new_tokens: ClassVar[int] = 32
    # answer span vs target -> the item's score, stored under the one metric's name (token_f1 reuses all else)
    compare = staticmethod(exact_match)

    def is_done(self, item: EvalItem, generation: str) -> bool:
        return answer_span_closed(generation)

    def score_generation(self, item: EvalItem, generation: str) -> Row:
        prediction = clean_generation(generation)
        (metric,) = self.metrics
        return {
            "prediction": prediction,
            "generation": generation,
            "target": item.target,
            metric: self.compare(prediction, item.target),
        }
