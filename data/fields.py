"""Declared types and valid ranges for every config field.

A config dataclass annotates each field with what is valid, next to its default:

    epochs: Annotated[int, Range(1, 1000)] = 3   # passes over each period's training data
    run_id: Annotated[str, Name(empty_ok=True)] = ""

`field_problems(obj, "train")` checks every annotated field of one section and returns one message per
problem, each naming the dotted field and the valid values, so the config loader, the `--help` text and
the generated test (tests/test_config_fields.py) all read the same declaration. Every int, float, str and
list field must carry one; a test enforces that, so a field added later cannot skip validation.
Cross-field rules (top_k <= num_keys) stay in each section's own validate().

`build_dataclass(cls, mapping, path, problems)` is the one builder from parsed YAML to a section: it
checks types, unknown keys, required keys, then the declared constraints, collecting every problem.
The run config (training/config.py) and the stream file (data/streams/config.py) both build through it,
so a type error reads the same in either.

This sits in data/, the lowest layer that owns a config section, so that data, the methods and the
training config can all use it without an import running back up.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Literal, Union

# A name that becomes a path component (run ids, period names, module names): no separators, no
# leading dot (so never "." or ".."), printable ASCII only.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
MAX_NAME_LEN = 128
MAX_TEXT_LEN = 4096  # PATH_MAX on Linux; longer strings in a config are a mistake, not a path


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """A closed (or, with lo_open/hi_open, half-open) interval for a number; NaN and inf never pass."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def describe(self) -> str:
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{_fmt(self.lo)}, {_fmt(self.hi)}{right}"

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None  # a type problem, reported by the loader's type check
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number {self.describe()}"
        too_low = value <= self.lo if self.lo_open else value < self.lo
        too_high = value >= self.hi if self.hi_open else value > self.hi
        return f"must be {self.describe()}" if too_low or too_high else None

    def bad_values(self, is_int: bool) -> list[Any]:
        """Out-of-range values for the generated test: just outside each end, and far outside."""
        step = 1 if is_int else 1e-6 * max(1.0, abs(self.hi - self.lo))
        below = self.lo if self.lo_open else self.lo - step
        above = self.hi if self.hi_open else self.hi + step
        huge = 10**30 if is_int else 1e300
        out = [int(below) if is_int else below, int(above) if is_int else above, huge, -huge]
        if not is_int:
            out += [math.nan, math.inf, -math.inf]
        return out


@dataclass(frozen=True)
class Name:
    """A single path component: run ids, period names, module names."""

    empty_ok: bool = False  # "" means "derive it" for some fields (run_id)
    pattern: re.Pattern[str] = NAME_RE

    def describe(self) -> str:
        empty = "empty or " if self.empty_ok else ""
        return (
            f"{empty}a name matching {self.pattern.pattern} of at most {MAX_NAME_LEN} characters "
            "(one path component: no '/', not '.' or '..')"
        )

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return None
        if value == "" and self.empty_ok:
            return None
        if len(value) > MAX_NAME_LEN or not self.pattern.match(value):
            return f"must be {self.describe()}"
        return None

    def bad_values(self, is_int: bool) -> list[Any]:
        out = ["a/b", "../escape", "/abs/path", ".", "..", "x" * (MAX_NAME_LEN + 1), "bad\nname"]
        return out if self.empty_ok else [""] + out


@dataclass(frozen=True)
class Text:
    """Free text or a path the user names (a hub id, a directory): bounded, no NUL, maybe non-empty."""

    empty_ok: bool = True

    def describe(self) -> str:
        return f"{'' if self.empty_ok else 'a non-empty '}text of at most {MAX_TEXT_LEN} characters without NUL"

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return None
        if (not self.empty_ok and not value.strip()) or len(value) > MAX_TEXT_LEN or "\0" in value:
            return f"must be {self.describe()}"
        return None

    def bad_values(self, is_int: bool) -> list[Any]:
        out = ["x" * (MAX_TEXT_LEN + 1), "nul\0byte"]
        return out if self.empty_ok else ["", "   "] + out


Rule = Range | Name | Text


@dataclass(frozen=True)
class Items:
    """A list: its length bounds and the rule each element follows."""

    min_len: int
    max_len: int
    each: Rule

    def describe(self) -> str:
        return f"a list of {self.min_len} to {self.max_len} entries, each {self.each.describe()}"

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, list):
            return None
        if not self.min_len <= len(value) <= self.max_len:
            return f"must be {self.describe()}"
        for item in value:
            if self.each.problem(item):
                return f"must be {self.describe()}"
        return None


Constraint = Range | Name | Text | Items
# A bool or a Literal names its valid values in its type; these need no declared constraint.
_SELF_DESCRIBING = (bool,)


def constraints_of(cls: type) -> dict[str, Constraint | None]:
    """Each field's declared constraint (None where the field has none) for one dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: dict[str, Constraint | None] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        found = None
        if typing.get_origin(tp) is typing.Annotated:
            found = next((m for m in tp.__metadata__ if isinstance(m, (Range, Name, Text, Items))), None)
        out[f.name] = found
    return out


def needs_constraint(tp: Any) -> bool:
    """Whether a field of this (Annotated-stripped) type must declare a constraint."""
    if typing.get_origin(tp) is typing.Literal or tp in _SELF_DESCRIBING:
        return False
    return not (dataclasses.is_dataclass(tp) or tp is Any)


_TYPE_OK: dict[Any, Any] = {
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _type_ok(tp: Any, value: Any) -> bool:
    """Whether `value` has base type `tp` (a bool is not a number here)."""
    check = _TYPE_OK.get(tp)
    return check(value) if check is not None else isinstance(value, tp)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", list: "a list"}


def field_problems(obj: Any, path: str) -> list[str]:
    """One message per field of `obj` that breaks its declared constraint; `path` is the section.

    Also checks the base type, so a section built directly in code (not through the config loader,
    which checks types first) gets a message rather than a crash for `seed=True` or `periods="2018"`.
    """
    problems = []
    hints = typing.get_type_hints(type(obj))
    for name, rule in constraints_of(type(obj)).items():
        if rule is None:
            continue
        value = getattr(obj, name)
        dotted = f"{path}.{name}" if path else name
        base = typing.get_origin(hints[name]) or hints[name]
        type_ok = _type_ok(base, value)
        if isinstance(rule, Items) and type_ok:
            inner = typing.get_args(hints[name])[0]
            type_ok = all(_type_ok(inner, v) for v in value)
        if not type_ok:
            what = "" if isinstance(rule, Items) else _TYPE_NAMES.get(base, str(base)) + " "
            problems.append(f"{dotted} must be {what}{rule.describe()} (got {_show(value)})")
            continue
        msg = rule.problem(value)
        if msg:
            problems.append(f"{dotted} {msg} (got {_show(value)})")
    return problems


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------
# Building a section from a parsed mapping

Check = Callable[[Any, str], list[str]]


def type_name(tp: Any) -> str:
    """A field's type as a message says it: 'an integer', "one of 'a', 'b'", 'a list of a string'."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping to {type_name(typing.get_args(tp)[1])}"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def coerce(value: Any, tp: Any, dotted: str, problems: list[str], check: Check = field_problems) -> Any:
    """`value` as type `tp`, or a problem appended and an empty value of the type returned, so the
    cross-field checks that still run see well-typed fields."""
    origin = typing.get_origin(tp)
    bad = f"{dotted} must be {type_name(tp)} (got {_show(value)})"
    if origin in (Union, types.UnionType):
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        for arm in arms:
            if arm is type(None):  # None itself is handled above; any other value is not null
                continue
            trial: list[str] = []
            out = coerce(value, arm, dotted, trial, check)
            if not trial:
                return out
        section = next((a for a in arms if isinstance(a, type) and dataclasses.is_dataclass(a)), None)
        if section is not None:  # `Section | None`: the section's own problems say more than "a mapping"
            return build_dataclass(section, value, dotted, problems, check=check)
        problems.append(bad)
        return value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, dotted, problems, check=check)
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(bad)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            problems.append(bad)
            return []
        return [coerce(v, typing.get_args(tp)[0], f"{dotted}[{i}]", problems, check) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            problems.append(bad)
            return {}
        inner = typing.get_args(tp)[1]
        return {str(k): coerce(v, inner, f"{dotted}.{k}", problems, check) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(bad)
            return 0
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string; a float field means a number was meant
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(bad)
            return 0.0
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `split: 2020` as an int; a string field means text
        if not isinstance(value, str):
            problems.append(bad)
            return ""
        return value
    return value


def build_dataclass(
    cls: type, data: Any, path: str, problems: list[str], skip: Collection[str] = (), check: Check = field_problems
) -> Any:
    """Instantiate dataclass `cls` from a mapping, appending every problem (each naming its dotted field).

    `skip` names keys the caller builds itself (left at their defaults here); a class may list the
    keys it requires in a `REQUIRED` class attribute; `check` gives the declared-constraint problems of
    a built section (field_problems, or a superset that knows more rules).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{path or 'config'} must be a mapping (got {type(data).__name__})")
        data = {}
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    num_before = len(problems)
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key in skip:
            continue
        if key not in names:
            problems.append(f"unknown key {dotted}; known keys: {', '.join(names)}")
            continue
        kwargs[key] = coerce(value, hints[key], dotted, problems, check)
    for key in getattr(cls, "REQUIRED", ()):
        if key not in data and key not in skip:
            problems.append(f"{path}.{key} is required" if path else f"{key} is required")
    obj = cls(**kwargs)
    # Range checks assume well-typed values, and cross-field checks in-range ones; each runs only when
    # the step before it found nothing, so one bad value gives one message, never a crash.
    if len(problems) == num_before:
        problems.extend(check(obj, path))
    validate = getattr(obj, "validate", None)
    if callable(validate) and len(problems) == num_before:
        problems.extend(validate())
    return obj
