"""Declared valid values for stream-file fields that data/fields.py has no rule for.

data/fields.py covers numbers (Range), names (Name), free text (Text) and flat lists (Items). A stream
file also has mappings (a source's ``fields: {question: str}``), lists of lists (``orders:``), lists of
sections (``tasks:``), closed vocabularies inside a mapping (a field's type) and patterns that are not
path components (a dotted field name). These rules follow the same protocol (``describe()`` for the
docs and ``problem(value)`` returning one message or None) so the loader checks every field the same
way: ``problems_of(obj, path)`` = ``field_problems`` for the fields.py rules + these.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from data.fields import Items, Name, Range, Text, field_problems


def show(value: Any) -> str:
    """A value quoted in a message, shortened so one bad field cannot flood the terminal."""
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


@dataclass(frozen=True)
class Pattern:
    """A string matching a regular expression (a dotted field name, a Python identifier)."""

    regex: re.Pattern[str]
    what: str
    empty_ok: bool = False

    def describe(self) -> str:
        empty = "empty or " if self.empty_ok else ""
        return f"{empty}{self.what} matching {self.regex.pattern}"

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be a string, {self.describe()}"
        if value == "" and self.empty_ok:
            return None
        if len(value) > 256 or not self.regex.match(value):
            return f"must be {self.describe()}"
        return None


@dataclass(frozen=True)
class Choice:
    """One of a closed set of strings, where a Literal type cannot say it (inside a mapping)."""

    values: tuple[str, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(self.values)

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else f"must be {self.describe()}"


Scalar = Range | Name | Text | Pattern | Choice


def _element_problem(rule: Scalar | Items, value: Any) -> str | None:
    if isinstance(rule, Items):
        if not isinstance(value, list):
            return f"must be {rule.describe()}"
        return rule.problem(value)
    if isinstance(rule, (Range,)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number {rule.describe()}"
    elif isinstance(rule, (Name, Text)) and not isinstance(value, str):
        return f"must be a string, {rule.describe()}"
    return rule.problem(value)


@dataclass(frozen=True)
class Mapping:
    """A mapping: how many entries, and the rule every key and every value follows."""

    key: Scalar
    value: Scalar | Items
    min_len: int = 0
    max_len: int = 1000

    def describe(self) -> str:
        return (
            f"a mapping of {self.min_len} to {self.max_len} entries, each key {self.key.describe()} "
            f"and each value {self.value.describe()}"
        )

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, dict):
            return f"must be {self.describe()}"
        if not self.min_len <= len(value) <= self.max_len:
            return f"must be {self.describe()}"
        for k, v in value.items():
            msg = _element_problem(self.key, k)
            if msg:
                return f"key {show(k)} {msg}"
            msg = _element_problem(self.value, v)
            if msg:
                return f"[{k}] {msg}"
        return None


@dataclass(frozen=True)
class Seq:
    """A list whose entries are lists (each=Items) or sections (each=None, checked as dataclasses)."""

    min_len: int
    max_len: int
    each: Items | None = None
    what: str = "entries"

    def describe(self) -> str:
        each = f", each {self.each.describe()}" if self.each else ""
        return f"a list of {self.min_len} to {self.max_len} {self.what}{each}"

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, list) or not self.min_len <= len(value) <= self.max_len:
            return f"must be {self.describe()}"
        if self.each is not None:
            for i, item in enumerate(value):
                msg = _element_problem(self.each, item)
                if msg:
                    return f"[{i}] {msg}"
        return None


LocalRule = Pattern | Choice | Mapping | Seq


def local_rules_of(cls: type) -> dict[str, LocalRule]:
    """The fields of a dataclass that declare one of this module's rules."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, LocalRule] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Annotated:
            found = next((m for m in tp.__metadata__ if isinstance(m, (Pattern, Choice, Mapping, Seq))), None)
            if found is not None:
                out[f.name] = found
    return out


def rule_of(cls: type, name: str) -> Any:
    """The declared rule of one field (a fields.py rule or one of this module's), or None."""
    hints = typing.get_type_hints(cls, include_extras=True)
    tp = hints[name]
    if typing.get_origin(tp) is typing.Annotated:
        return next(
            (m for m in tp.__metadata__ if isinstance(m, (Range, Name, Text, Items, Pattern, Choice, Mapping, Seq))),
            None,
        )
    return None


def problems_of(obj: Any, path: str, skip: Collection[str] = ()) -> list[str]:
    """Every declared-rule problem of one section, each message starting with the dotted field.

    `skip` names fields the caller builds and checks itself (a stream's task list).
    """
    problems = field_problems(obj, path)
    for name, rule in local_rules_of(type(obj)).items():
        if name in skip:
            continue
        value = getattr(obj, name)
        msg = rule.problem(value)
        if msg:
            dotted = f"{path}.{name}" if path else name
            sep = "" if msg.startswith("[") else " "
            problems.append(f"{dotted}{sep}{msg} (got {show(value)})")
    return problems
