"""Every field of every config section, generated from the dataclasses: each must declare what is valid,
and every kind of wrong value (wrong type, out of range, NaN/inf, empty, huge, a path where a name
belongs) must end in exit 2, one `error:` line naming the field, no traceback and nothing written.

The cases are derived from the declarations (data/fields.py), so a field added to any section later,
the method sections included, is swept without editing this file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from data.fields import Items, Name, Range, Text, constraints_of, needs_constraint
from training import cli
from training.config import RunConfig
from training.methods import METHODS


def _sections() -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) for every config section, nested ones and each method's options."""
    out: list[tuple[str, type]] = []

    def walk(cls: type, prefix: str) -> None:
        out.append((prefix, cls))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(RunConfig, "")
    for name, method in METHODS.items():
        walk(method.config_cls, f"method.{name}.")
    return out


def _fields() -> list[tuple[str, Any, Any]]:
    """(dotted field, type without Annotated, declared constraint) for every leaf field."""
    out = []
    for prefix, cls in _sections():
        hints = typing.get_type_hints(cls)
        rules = constraints_of(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp) or (prefix == "method." and f.name in ("name", "options")):
                continue  # sections, and method.name/options (the registry validates those)
            out.append((prefix + f.name, tp, rules[f.name]))
    return out


def _wrong_type(tp: Any) -> list[Any]:
    origin = typing.get_origin(tp)
    if tp is bool:
        return ["maybe", 2, [True]]
    if tp is int:
        return ["three", 1.5, True, [1], {"a": 1}]
    if tp is float:
        return ["fast", True, [0.1], {"a": 1}]
    if tp is str:
        return [["a"], {"a": 1}, True]
    if origin is list:
        return ["not-a-list", 7, {"a": 1}]
    if origin is typing.Literal:
        return ["bogus", 12345, [1]]
    raise AssertionError(f"no wrong-type values for {tp}")


def _bad_values(tp: Any, rule: Any) -> list[Any]:
    values = list(_wrong_type(tp))
    if isinstance(rule, (Range, Name, Text)):
        values += rule.bad_values(tp is int)
    elif isinstance(rule, Items):
        inner = typing.get_args(tp)[0]
        good = _good_item(rule.each, inner is int)
        values += [[good] * (rule.max_len + 1)]
        if rule.min_len > 0:
            values += [[]]
        values += [[bad] for bad in rule.each.bad_values(inner is int)[:3]]
    return values


def _good_item(rule: Any, is_int: bool) -> Any:
    if isinstance(rule, Range):
        return int(rule.lo) + 1 if is_int else (rule.lo + rule.hi) / 2
    return "abc1"


CASES = [(dotted, value) for dotted, tp, rule in _fields() for value in _bad_values(tp, rule)]


def test_every_field_declares_what_is_valid():
    missing = [dotted for dotted, tp, rule in _fields() if rule is None and needs_constraint(tp)]
    assert not missing, f"fields without a declared constraint (data/fields.py): {missing}"
    assert len(CASES) > 300  # the sweep really covers every section


def _as_yaml_scalar(value: Any) -> str:
    """How a user would type the value in `--set key=value` (parsed as YAML)."""
    if isinstance(value, float) and math.isnan(value):
        return ".nan"
    if isinstance(value, float) and math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    if isinstance(value, str):
        return value if value and value.strip() == value and "\n" not in value and "\0" not in value else None  # type: ignore[return-value]
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


@pytest.mark.parametrize("dotted, value", CASES, ids=[f"{d}={v!r}"[:80] for d, v in CASES])
def test_bad_value_exits_2_with_one_line_naming_the_field_and_writes_nothing(tmp_path: Path, capsys, monkeypatch,
                                                                             dotted: str, value: Any):
    # In-process (the same code path as main.py without 8 s of imports per case), from an empty working
    # directory with HOME and the model cache inside tmp_path, so "nothing written" means anywhere.
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    method = dotted.split(".")[1] if dotted.startswith("method.") else "lora"
    typed = _as_yaml_scalar(value)
    args = ["--mode", "synthetic", "--method", method, "--run-root", str(work / "runs")]
    if typed is not None:
        args += ["--set", f"{dotted}={typed}"]
    else:  # values a command line cannot carry as YAML (NUL, newlines, padding) go through a config file
        import yaml

        tree: dict[str, Any] = {}
        node = tree
        *head, last = dotted.split(".")
        for key in head:
            node = node.setdefault(key, {})
        node[last] = value
        config = tmp_path / "bad.yaml"
        config.write_text(yaml.safe_dump({"mode": "synthetic", **tree}))
        args = ["--config", str(config), "--method", method]
        if dotted != "run_root":  # a flag outranks the file, and would hide the bad value
            args += ["--run-root", str(work / "runs")]
    code = cli.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    # the whole dotted name of the bad field, not only its section ("train.casmo" for train.casmo.beta1)
    assert re.search(rf"(?<![\w.]){re.escape(dotted)}(?![\w])", lines[0]), lines[0]
    assert list(work.iterdir()) == []
    assert not (tmp_path / "home").exists() and not (tmp_path / "cache").exists()
