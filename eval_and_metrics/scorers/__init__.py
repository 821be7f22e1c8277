"""The scorer registry: every way a task can be scored, written out in one place.

Keys are lowercase snake case and match the module names (tests/test_scorers.py checks that). A
task names its scorer by key; `SCORERS[key]()` builds it with its defaults. Formulas and the
lm-eval-harness names of the metrics: docs/scorers.md.
"""

from __future__ import annotations

from eval_and_metrics.scorers.base import OUTPUT_TYPES, Row, Scorer
from eval_and_metrics.scorers.code_pass_at_1 import CodePassAt1, check_reference_solutions
from eval_and_metrics.scorers.code_pass_at_1_lm_eval import CodePassAt1LmEval
from eval_and_metrics.scorers.exact_match import ExactMatch
from eval_and_metrics.scorers.multiple_choice import MultipleChoice
from eval_and_metrics.scorers.numeric import Numeric
from eval_and_metrics.scorers.perplexity import Perplexity
from eval_and_metrics.scorers.rouge_l import RougeL
from eval_and_metrics.scorers.token_f1 import TokenF1

SCORERS: dict[str, type[Scorer]] = {
    "exact_match": ExactMatch,
    "token_f1": TokenF1,
    "numeric": Numeric,
    "multiple_choice": MultipleChoice,
    "code_pass_at_1": CodePassAt1,
    "code_pass_at_1_lm_eval": CodePassAt1LmEval,
    "perplexity": Perplexity,
    "rouge_l": RougeL,
}

__all__ = ["OUTPUT_TYPES", "SCORERS", "Row", "Scorer", "check_reference_solutions"]
