"""What every source shares: the Source interface, documents, counts, paths and field type checks.

A source turns its options and a split name into documents (plain dicts of named fields, each with
an id and a ``where`` for error messages: "file:line" or "dataset[split] row n"). It declares the
fields its documents carry, so a stream file's templates are checked before any data is read, and
it counts what it read and what it used. It never drops a record it cannot use without saying so:
a bad record is a DataError naming the file, the line and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from data.errors import DataError

# Types a declared field may have. Lists of lists and floats inside lists never occur in the data sets
# the presets use; refusing them keeps the type check exact.
FIELD_TYPES = ("str", "int", "float", "bool", "list[str]", "list[int]")
# A declared field name: a column, or a dotted path into a nested mapping ("choices.text").
FIELD_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# At most this many record problems are listed per file before the error is raised, so a file with a
# systematic mistake (a renamed column) gives a readable message rather than thousands of lines.
MAX_RECORD_PROBLEMS = 10


@dataclass(frozen=True)
class Doc:
    """One source record: its fields, a stable id (unique within the split) and where it came from."""

    id: str
    where: str
    fields: dict[str, Any]


@dataclass
class SourceRead:
    """The documents of one split, and counts and notes for the task's meta."""

    docs: list[Doc]
    meta: dict[str, Any] = field(default_factory=dict)
    # the delimiter the source's own task puts before each choice (an lm-eval task's target_delimiter):
    # it replaces format.choice_prefix, and the choices are kept verbatim, as that task scores them
    choice_delimiter: str | None = None


@dataclass(frozen=True)
class ReadContext:
    """What a source needs besides its options: the stream file, the data seed, the task and its kind."""

    stream_file: Path
    seed: int
    task: str
    kind: str  # the task's scorer kind (data/streams/kinds.py): picks the standard schema of user files

    def path(self, raw: str, option: str) -> Path:
        """A path option: ${VAR} expanded (unset -> DataError), relative to the stream file's directory."""

        def env(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if not value:
                raise DataError(
                    f"{self.stream_file}: task {self.task!r}: source.{option} {raw!r} needs the "
                    f"environment variable {m.group(1)}, which is not set; set it to the path "
                    "of your copy of the data"
                )
            return value

        expanded = Path(_ENV_RE.sub(env, raw)).expanduser()
        return expanded if expanded.is_absolute() else (self.stream_file.parent / expanded)


class RecordProblems:
    """Collects record-level problems of one file and raises them together as one DataError."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []
        self.num_more = 0

    def add(self, message: str) -> None:
        if len(self.items) < MAX_RECORD_PROBLEMS:
            self.items.append(message)
        else:
            self.num_more += 1

    def raise_if_any(self) -> None:
        if self.items:
            more = [f"and {self.num_more} more problems in {self.what}"] if self.num_more else []
            raise DataError(self.items + more)


@dataclass(frozen=True)
class JsonlLine:
    """One non-blank line of a JSONL file: its parsed value, or the one-line problem why it has none."""

    lineno: int
    where: str  # "<path>:<lineno>", as the problems name the line
    value: Any = None
    problem: str | None = None  # "<path>:<lineno>: malformed JSON at column C: <why>"


def jsonl_lines(text: str, path: Path | str) -> Iterator[JsonlLine]:
    """The non-blank lines of JSONL `text`, parsed, numbered as an editor shows them: split on "\n" only,
    not splitlines(), because JSON text may hold U+2028, which splitlines() would treat as a line end and so
    shift every later line number. Each caller decides what a malformed line or a non-object costs."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            yield JsonlLine(lineno, where, problem=f"{where}: malformed JSON at column {exc.colno}: {exc.msg}")
            continue
        yield JsonlLine(lineno, where, value)


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _has_type(value: Any, tp: str) -> bool:
    if tp == "str":
        return isinstance(value, str)
    if tp == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if tp == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if tp == "bool":
        return isinstance(value, bool)
    if tp.startswith("list["):
        inner = tp[len("list[") : -1]
        return isinstance(value, list) and all(_has_type(v, inner) for v in value)
    raise AssertionError(f"unknown field type {tp}")  # declared types are validated at config time


def check_fields(fields: dict[str, Any], declared: dict[str, str], where: str) -> list[str]:
    """One message per declared field that is missing or has the wrong type in a record."""
    problems = []
    for name, tp in declared.items():
        value: Any = fields
        missing = False
        for key in name.split("."):
            if isinstance(value, dict) and key in value:
                value = value[key]
            else:
                missing = True
                break
        if missing:
            problems.append(f"{where}: missing field {name!r} (declared {tp})")
        elif not _has_type(value, tp):
            problems.append(f"{where}: field {name!r} must be {tp} (got {type_name(value)} {_short(value)})")
    return problems


def apply_labels(fields: dict[str, Any], labels: dict[str, list[str]], where: str) -> list[str]:
    """Replace each integer class id named in ``labels`` by its name, in place; problems as messages."""
    problems = []
    for name, names in labels.items():
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(names):
            problems.append(
                f"{where}: field {name!r} must be a class id 0..{len(names) - 1} to map "
                f"through labels.{name} (got {_short(value)})"
            )
        else:
            fields[name] = names[value]
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "..."


class Source:
    """A kind of data source. Subclasses set the class attributes and implement read()."""

    name: ClassVar[str]
    options_cls: ClassVar[type]
    # One line for docs and error messages.
    summary: ClassVar[str]

    def splits(self, opts: Any) -> tuple[str, ...] | None:
        """The split names this source has with these options; None = any name (checked when read)."""
        return None

    def default_split(self, opts: Any) -> str:
        """The split that `split: {eval_fraction}` divides when it names none."""
        return "train"

    def fields(self, opts: Any, kind: str) -> dict[str, str]:
        """Declared document fields (dotted name -> type) with these options, for offline checks."""
        raise NotImplementedError

    def default_format(self, opts: Any, kind: str) -> dict[str, Any]:
        """Format keys used where the task's format gives none (lm-eval's task defaults)."""
        return {}

    def check(self, opts: Any, kind: str) -> list[str]:
        """Extra offline checks of the options (messages start with the option name)."""
        return []

    def read(self, opts: Any, split: str, ctx: ReadContext) -> SourceRead:
        raise NotImplementedError
