"""token_f1: greedy answer, cut like exact_match, SQuAD token F1 against the target (partial credit)."""

from __future__ import annotations

from typing import ClassVar

from eval_and_metrics.scorers.exact_match import ExactMatch
from eval_and_metrics.scoring import token_f1


class TokenF1(ExactMatch):
    """exact_match's answer span and early stop; only the comparison differs."""

    name: ClassVar[str] = "token_f1"
    metrics: ClassVar[dict[str, bool]] = {"token_f1": True}
    compare = staticmethod(token_f1)
