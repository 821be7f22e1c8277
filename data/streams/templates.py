"""Prompt templates: how a source document becomes the text of a prompt, a target or a choice.

A template is text with ``{field}`` placeholders, lm-eval's doc_to_text/doc_to_target without Jinja:

- ``{question}`` a top-level field; ``{choices.text}`` a key of a nested mapping; ``{choices.0}`` an
  element of a list;
- ``{answer|final_number}`` a field passed through named filters (FILTERS, applied left to right);
- ``{{`` and ``}}`` are literal braces (code prompts need them).

Only these forms exist, so a template can be checked against a source's declared fields before any
data is read (``template_problems``): a misspelt field is a config error, never a silently empty
prompt (the five-fallback-strings trap in ../shared/LESSONS.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from data.numbers import final_number

_REF_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_DEF_RE = re.compile(r"^\s*def\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.MULTILINE)
_TOP_DEF_RE = re.compile(r"^def\s+([A-Za-z_][A-Za-z0-9_]*)\s*\(", re.MULTILINE)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TemplateError(ValueError):
    """A template that cannot be parsed, or a document it cannot be rendered from."""


@dataclass(frozen=True)
class Ref:
    """One placeholder: the field path and the filters applied to its value."""

    path: tuple[str, ...]
    filters: tuple[str, ...]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)


Part = str | Ref


def _final_number(value: Any) -> str:
    """GSM8K's answer, read as the numeric scorer reads a generation (data/numbers.py): the number on
    the first '#### n' line, else the last number; as a plain decimal ("#### $1,000" -> "1000")."""
    text = _as_text(value, "final_number")
    found = final_number(text)
    if not found:
        raise TemplateError(f"final_number: no number in {text[-60:]!r}")
    return found


def _lines(value: Any) -> str:
    return "\n".join(_as_text(v, "lines") for v in _as_list(value, "lines"))


def _join(value: Any) -> str:
    return ", ".join(_as_text(v, "join") for v in _as_list(value, "join"))


def _indented(value: Any) -> str:
    """A list (or a text's lines), each line indented 4 spaces: asserts as the body of a check()."""
    lines = _as_list(value, "indented") if isinstance(value, list) else _as_text(value, "indented").split("\n")
    return "\n".join("    " + line for item in lines for line in _as_text(item, "indented").split("\n"))


def _lettered(value: Any) -> str:
    items = _as_list(value, "lettered")
    if len(items) > len(LETTERS):
        raise TemplateError(f"lettered: {len(items)} entries, at most {len(LETTERS)}")
    return "\n".join(f"{LETTERS[i]}. {_as_text(v, 'lettered')}" for i, v in enumerate(items))


def _letter(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(LETTERS):
        raise TemplateError(f"letter: needs an index 0..25 (got {value!r})")
    return LETTERS[value]


def _first_def(text: str, name: str) -> re.Match[str]:
    found = _TOP_DEF_RE.search(text) or _DEF_RE.search(text)
    if not found:
        raise TemplateError(f"{name}: no 'def name(' in the text")
    return found


def _def_name(value: Any) -> str:
    return _first_def(_as_text(value, "def_name"), "def_name").group(1)


def _def_end(text: str, name: str) -> int:
    """Where the first function's signature ends: after the first line from its 'def' ending in ':'."""
    start = _first_def(text, name).start()
    pos = start
    while True:
        end = text.find("\n", pos)
        line = text[pos:] if end < 0 else text[pos:end]
        if line.rstrip().endswith(":") or end < 0:
            return len(text) if end < 0 else end + 1
        pos = end + 1


def _through_def(value: Any) -> str:
    text = _as_text(value, "through_def")
    return text[: _def_end(text, "through_def")]


def _after_def(value: Any) -> str:
    text = _as_text(value, "after_def")
    return text[_def_end(text, "after_def") :]


# Each filter is a small named function of the field's value, as lm-eval names its filters.
FILTERS: dict[str, Callable[[Any], str]] = {
    "final_number": _final_number,  # the number on the first '#### n' line (else the last number), plain
    "lines": _lines,  # a list joined with newlines (MBPP's test_list -> a test program)
    "join": _join,  # a list joined with ', '
    "indented": _indented,  # a list (or lines) indented 4 spaces: MBPP's asserts inside def check(candidate)
    "lettered": _lettered,  # a list as 'A. x\nB. y\n...' (multiple-choice prompts)
    "letter": _letter,  # an index 0, 1, ... as 'A', 'B', ...
    "def_name": _def_name,  # the name of the first 'def' in a code text (an entry point)
    # a whole program split after the first function's signature: prompt and body, as HumanEval's
    # prompt ends where the body starts (MBPP's reference code -> a prompt that defines the function)
    "through_def": _through_def,
    "after_def": _after_def,
    "strip": lambda v: _as_text(v, "strip").strip(),
    "lower": lambda v: _as_text(v, "lower").lower(),
}
LIST_FILTERS = frozenset({"lines", "join", "lettered", "indented"})  # the filters that take a whole list


def _as_list(value: Any, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise TemplateError(f"{name}: needs a list (got {type(value).__name__})")
    return value


def _as_text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    raise TemplateError(
        f"{what}: is a {type(value).__name__}; index it ({{x.0}}) or use a list filter "
        f"({', '.join(sorted(LIST_FILTERS))})"
    )


def parse(template: str) -> list[Part]:
    """Split a template into literal text and Refs; raises TemplateError naming the bad placeholder."""
    parts: list[Part] = []
    buf: list[str] = []
    i = 0
    while i < len(template):
        ch = template[i]
        if template.startswith("{{", i) or template.startswith("}}", i):
            buf.append(ch)
            i += 2
        elif ch == "{":
            end = template.find("}", i + 1)
            if end < 0:
                raise TemplateError(f"unclosed '{{' at character {i}")
            inner = template[i + 1 : end]
            path, *filters = [s.strip() for s in inner.split("|")]
            if not _REF_RE.match(path):
                raise TemplateError(
                    f"{{{inner}}} is not a field reference like {{question}}, {{choices.0}} "
                    "or {answer|final_number}; write {{ and }} for literal braces"
                )
            unknown = [f for f in filters if f not in FILTERS]
            if unknown:
                raise TemplateError(f"{{{inner}}}: unknown filter {unknown[0]!r}; filters: {', '.join(FILTERS)}")
            if buf:
                parts.append("".join(buf))
                buf = []
            parts.append(Ref(tuple(path.split(".")), tuple(filters)))
            i = end + 1
        elif ch == "}":
            raise TemplateError(f"unmatched '}}' at character {i}; write }}}} for a literal brace")
        else:
            buf.append(ch)
            i += 1
    if buf:
        parts.append("".join(buf))
    return parts


def lookup(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at a field path: mapping keys, and integer indices into lists."""
    value: Any = doc
    for depth, key in enumerate(path):
        where = ".".join(path[: depth + 1])
        if isinstance(value, dict):
            if key not in value:
                raise TemplateError(f"field {where!r} is missing")
            value = value[key]
        elif isinstance(value, list) and key.isdigit():
            if int(key) >= len(value):
                raise TemplateError(f"field {where!r}: index {key} out of range (the list has {len(value)})")
            value = value[int(key)]
        else:
            raise TemplateError(f"field {where!r}: cannot look up {key!r} in a {type(value).__name__}")
    return value


def render(template: str, doc: dict[str, Any]) -> str:
    out: list[str] = []
    for part in parse(template):
        if isinstance(part, str):
            out.append(part)
            continue
        value = lookup(doc, part.path)
        for name in part.filters:
            value = FILTERS[name](value)
        out.append(_as_text(value, f"{{{part.dotted}}}"))
    return "".join(out)


def refs(template: str) -> list[Ref]:
    return [p for p in parse(template) if isinstance(p, Ref)]


def declared_type(path: tuple[str, ...], declared: dict[str, str]) -> str | None:
    """The declared type of a field path, following list indices (`choices.0` of a list[str] is str)."""
    dotted = ".".join(path)
    if dotted in declared:
        return declared[dotted]
    if len(path) > 1 and path[-1].isdigit():
        parent = declared_type(path[:-1], declared)
        if parent is not None and parent.startswith("list["):
            return parent[len("list[") : -1]
    return None


def template_problems(template: str, declared: dict[str, str]) -> list[str]:
    """What is wrong with a template given the source's declared fields (name -> type), offline."""
    try:
        found = refs(template)
    except TemplateError as exc:
        return [str(exc)]
    problems = []
    for ref in found:
        tp = declared_type(ref.path, declared)
        if tp is None:
            problems.append(
                f"{{{ref.dotted}}} is not a field of this source; its fields: {', '.join(sorted(declared)) or '(none)'}"
            )
        elif tp.startswith("list[") and not (ref.filters and ref.filters[0] in LIST_FILTERS):
            problems.append(
                f"{{{ref.dotted}}} is a list; index it ({{{ref.dotted}.0}}) or use a list filter "
                f"({', '.join(sorted(LIST_FILTERS))})"
            )
    return problems
