"""rouge_l: greedy response, ROUGE-L F-measure against the reference (rouge-score, Porter stemmer).

Used for dialogue and instruction tasks where an answer is a sentence or a paragraph, not a
span. The response is the generation with leading whitespace dropped, cut at the first blank line
("\\n\\n", lm-eval's default stop sequence for generate_until), stripped. rouge-score's tokenizer
lowercases and keeps only [a-z0-9] runs, so text without Latin letters or digits scores 0.
"""

from __future__ import annotations

from functools import lru_cache
from typing import ClassVar

from rouge_score import rouge_scorer

from data.streams.schema import EvalItem
from eval_and_metrics.scorers.base import GenerationScorer, Row

STOP_SEQUENCE = "\n\n"


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f(prediction: str, target: str) -> float:
    """ROUGE-L F-measure (LCS-based, beta = 1) of prediction against target."""
    return float(_scorer().score(target, prediction)["rougeL"].fmeasure)


def response(generation: str) -> str:
    return generation.lstrip().split(STOP_SEQUENCE, 1)[0].strip()


class RougeL(GenerationScorer):
    name: ClassVar[str] = "rouge_l"
    metrics: ClassVar[dict[str, bool]] = {"rouge_l": True}
    default_max_new_tokens: ClassVar[int] = 128

    def is_done(self, item: EvalItem, generation: str) -> bool:
        return STOP_SEQUENCE in generation.lstrip()

    def score_generation(self, item: EvalItem, generation: str) -> Row:
        prediction = response(generation)
        return {
            "prediction": prediction,
            "generation": generation,
            "target": item.target,
            "rouge_l": rouge_l_f(prediction, item.target),
        }
