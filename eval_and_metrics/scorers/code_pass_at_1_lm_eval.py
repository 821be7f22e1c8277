"""code_pass_at_1_lm_eval: HumanEval pass@1 exactly as lm-evaluation-harness's `humaneval` task scores it.

lm-eval (tasks/humaneval/humaneval.yaml) continues the raw prompt greedily and cuts the generation at
the first of its stop sequences "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint" (generation_kwargs.until,
max_gen_toks 1024); the program is prompt + completion, then the tests and check(entry_point)
(utils.build_predictions, HF evaluate's code_eval). So a model that closes the function and writes a
markdown fence or prose after it fails here as it fails there: the number is comparable to lm-eval's
`humaneval`, where code_pass_at_1 (which reads a fenced block and cuts at any top-level line) is more
forgiving of the output format. The program runs in the same sandbox.
"""

from __future__ import annotations

from typing import ClassVar

from data.streams.schema import EvalItem
from eval_and_metrics.scorers.base import Row
from eval_and_metrics.scorers.code_pass_at_1 import CodePassAt1, run_item, warn_once

# lm-eval's humaneval.yaml generation_kwargs.until, in its order
UNTIL: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def cut_at_stop(generation: str, until: tuple[str, ...] = UNTIL) -> tuple[str, bool]:
    """(the generation up to the first stop sequence, whether one was found), as lm-eval's until cuts it."""
    cuts = [generation.find(s) for s in until if s in generation]
    return (generation[: min(cuts)], True) if cuts else (generation, False)


class CodePassAt1LmEval(CodePassAt1):
    name: ClassVar[str] = "code_pass_at_1_lm_eval"
    default_max_new_tokens: ClassVar[int] = 1024  # lm-eval's max_gen_toks

    def is_done(self, item: EvalItem, generation: str) -> bool:
        return cut_at_stop(generation)[1]

    def score_generation(self, item: EvalItem, generation: str) -> Row:
        completion, _ = cut_at_stop(generation)
        result = run_item(item, completion, self.timeout_s, self.memory_mb)
        warn_once(result)
        return {
            "prediction": completion,
            "generation": generation,
            "pass_at_1": float(result.passed),
            "reason": result.reason,
        }
