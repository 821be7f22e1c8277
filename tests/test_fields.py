"""data/fields.py by hand: each rule's bounds and message, the type coercion of every kind of field, and
the section builder's order of checks. tests/test_config_fields.py sweeps every real field through the
CLI; these pin the pieces it is built from, one exact value each (and are what scripts/mutation.py runs
against data/fields.py: the sweep's 1,400 CLI cases per mutant would take hours)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional

import pytest

from data.fields import (
    MAX_NAME_LEN,
    MAX_TEXT_LEN,
    Items,
    Name,
    Range,
    Text,
    _fmt,
    _show,
    build_dataclass,
    coerce,
    constraints_of,
    field_problems,
    needs_constraint,
    type_name,
)


def test_numbers_print_as_a_user_typed_them():
    assert [_fmt(3.0), _fmt(3), _fmt(2.5), _fmt(1e-4), _fmt(1e20), _fmt(-7.0)] == ["3", "3", "2.5", "0.0001",
                                                                                 "1e+20", "-7"]
    # whole numbers in full below 10^15 (where :g would say 1e+06), in exponent form from there on
    assert [_fmt(1_000_000), _fmt(1e15 - 1), _fmt(1e15)] == ["1000000", "999999999999999", "1e+15"]


def test_range_bounds_closed_and_open():
    closed, open_ = Range(0, 1), Range(0, 1, lo_open=True, hi_open=True)
    assert closed.describe() == "in [0, 1]" and open_.describe() == "in (0, 1)"
    assert Range(0, 1, hi_open=True).describe() == "in [0, 1)" and Range(0, 1, lo_open=True).describe() == "in (0, 1]"
    assert closed.problem(0) is None and closed.problem(1) is None and closed.problem(0.5) is None
    assert closed.problem(-0.1) == "must be in [0, 1]" and closed.problem(1.1) == "must be in [0, 1]"
    assert open_.problem(0) == "must be in (0, 1)" and open_.problem(1.0) == "must be in (0, 1)"
    assert open_.problem(0.5) is None
    assert closed.problem(math.nan) == "must be a finite number in [0, 1]"
    assert closed.problem(math.inf) == "must be a finite number in [0, 1]"
    assert closed.problem(True) is None and closed.problem("2") is None  # type problems, reported apart


def test_range_bad_values_sit_just_outside_each_end():
    assert Range(1, 10).bad_values(is_int=True) == [0, 11, 10 ** 30, -10 ** 30]
    assert Range(1, 10, lo_open=True, hi_open=True).bad_values(is_int=True) == [1, 10, 10 ** 30, -10 ** 30]
    got = Range(0, 100).bad_values(is_int=False)
    assert got[:4] == pytest.approx([-1e-4, 100 + 1e-4, 1e300, -1e300], rel=1e-12, abs=0)  # step: 1e-6 of the width
    assert math.isnan(got[4]) and got[5:] == [math.inf, -math.inf]
    assert Range(0, 0.5).bad_values(is_int=False)[:2] == [-1e-6, 0.5 + 1e-6]  # at least 1e-6
    assert Range(10, 110).bad_values(is_int=False)[:2] == pytest.approx([10 - 1e-4, 110 + 1e-4], rel=1e-12, abs=0)
    # an int field with float bounds still gets int bad values (else the sweep tests a type error instead)
    assert [type(v) for v in Range(0.0, 1e6).bad_values(is_int=True)] == [int] * 4
    assert all(Range(1, 10).problem(v) for v in Range(1, 10).bad_values(is_int=True))


def test_name_is_one_path_component():
    rule = Name()
    assert rule.describe() == (f"a name matching ^[A-Za-z0-9][A-Za-z0-9_.-]*$ of at most {MAX_NAME_LEN} characters "
                               "(one path component: no '/', not '.' or '..')")
    assert Name(empty_ok=True).describe().startswith("empty or a name matching")
    assert rule.problem("run-1.a_b") is None and rule.problem("x" * MAX_NAME_LEN) is None
    for bad in ("", "a/b", ".", "..", ".hidden", "x" * (MAX_NAME_LEN + 1)):
        assert rule.problem(bad) == f"must be {rule.describe()}", bad
    assert Name(empty_ok=True).problem("") is None and rule.problem(3) is None
    assert rule.bad_values(False)[0] == "" and "" not in Name(empty_ok=True).bad_values(False)
    assert Name(empty_ok=True).bad_values(False) == ["a/b", "../escape", "/abs/path", ".", "..",
                                                     "x" * (MAX_NAME_LEN + 1), "bad\nname"]


def test_text_is_bounded_and_has_no_nul():
    free, required = Text(), Text(empty_ok=False)
    assert free.describe() == f"text of at most {MAX_TEXT_LEN} characters without NUL"
    assert required.describe() == f"a non-empty text of at most {MAX_TEXT_LEN} characters without NUL"
    assert free.problem("") is None and free.problem("x" * MAX_TEXT_LEN) is None and free.problem(1) is None
    assert free.problem("x" * (MAX_TEXT_LEN + 1)) == f"must be {free.describe()}"
    assert free.problem("a\0b") == f"must be {free.describe()}"
    assert required.problem("   ") == f"must be {required.describe()}" and required.problem(" a ") is None
    assert free.bad_values(False) == ["x" * (MAX_TEXT_LEN + 1), "nul\0byte"]
    assert required.bad_values(False) == ["", "   ", "x" * (MAX_TEXT_LEN + 1), "nul\0byte"]


def test_items_bound_the_length_and_check_each_entry():
    rule = Items(1, 2, Range(0, 1))
    assert rule.describe() == "a list of 1 to 2 entries, each in [0, 1]"
    assert rule.problem([0.5]) is None and rule.problem([0, 1]) is None and rule.problem("x") is None
    for bad in ([], [0, 0, 0], [0.5, 2]):
        assert rule.problem(bad) == f"must be {rule.describe()}", bad


@dataclass
class Inner:
    k: Annotated[int, Range(1, 4)] = 2


@dataclass
class Section:
    REQUIRED = ("name",)
    name: Annotated[str, Name()] = "a"
    rate: Annotated[float, Range(0, 1)] = 0.5
    size: Annotated[int, Range(1, 8)] = 2
    tags: Annotated[list[str], Items(0, 2, Name())] = field(default_factory=list)
    flag: bool = False
    mode: Literal["x", "y"] = "x"
    inner: Inner = field(default_factory=Inner)
    note: str = ""  # no constraint: field_problems skips it
    last: Annotated[int, Range(0, 1)] = 0  # a constrained field after unconstrained ones is still checked
    ns: Annotated[list[int], Items(0, 3, Range(0, 9))] = field(default_factory=list)
    doc: Annotated[int, "only a note"] = 0  # metadata that is no rule: no constraint

    def validate(self) -> list[str]:
        return ["size must not exceed 4 when mode is y"] if self.mode == "y" and self.size > 4 else []


def test_constraints_and_which_fields_need_one():
    got = constraints_of(Section)
    assert got["rate"] == Range(0, 1) and got["name"] == Name() and got["tags"] == Items(0, 2, Name())
    assert got["flag"] is None and got["mode"] is None and got["note"] is None and got["inner"] is None
    assert got["doc"] is None and got["last"] == Range(0, 1)
    assert not needs_constraint(bool) and not needs_constraint(Literal["a"]) and not needs_constraint(Inner)
    assert not needs_constraint(Any)
    assert needs_constraint(int) and needs_constraint(str) and needs_constraint(list[int])


def test_field_problems_name_the_dotted_field_the_type_and_the_value():
    assert field_problems(Section(), "s") == []
    bad = Section(name="a/b", rate=2.0, size=True, tags=["ok", 3])  # type: ignore[arg-type]
    assert field_problems(bad, "s") == [
        f"s.name must be {Name().describe()} (got 'a/b')",
        "s.rate must be in [0, 1] (got 2.0)",
        "s.size must be an integer in [1, 8] (got True)",
        f"s.tags must be {Items(0, 2, Name()).describe()} (got ['ok', 3])",
    ]
    assert field_problems(Section(rate=3), "") == ["rate must be in [0, 1] (got 3)"]  # an int is a number
    assert field_problems(Section(tags=["a", "b", "c"]), "s") == [
        f"s.tags must be {Items(0, 2, Name()).describe()} (got ['a', 'b', 'c'])"]
    assert field_problems(Section(name=5), "s") == [f"s.name must be a string {Name().describe()} (got 5)"]  # type: ignore[arg-type]
    assert field_problems(Section(last=5), "s") == ["s.last must be in [0, 1] (got 5)"]
    assert field_problems(Section(ns=[True]), "s") == [  # a bool is no integer, in a list too
        f"s.ns must be {Items(0, 3, Range(0, 9)).describe()} (got [True])"]


def test_a_long_value_is_shown_cut():
    assert _show("ab") == "'ab'"
    assert _show("x" * 78) == "'" + "x" * 78 + "'"  # 80 characters: shown whole
    assert _show("x" * 100) == "'" + "x" * 59 + "... (102 characters)"
    assert _show("x" * 79) == "'" + "x" * 59 + "... (81 characters)"  # 81: cut


def test_type_names_as_messages_say_them():
    assert type_name(int) == "an integer" and type_name(float) == "a number" and type_name(str) == "a string"
    assert type_name(bool) == "true/false" and type_name(type(None)) == "null"
    assert type_name(Literal["a", "b"]) == "one of 'a', 'b'"
    assert type_name(list[int]) == "a list of an integer" and type_name(tuple[str, ...]) == "a list of a string"
    assert type_name(dict[str, float]) == "a mapping to a number"
    assert type_name(Optional[int]) == "an integer or null" and type_name(int | str) == "an integer or a string"
    assert type_name(Inner) == "a mapping" and type_name(complex) == "complex"


def test_coerce_each_kind_of_field():
    problems: list[str] = []
    assert coerce(3, int, "s.n", problems) == 3
    assert coerce("1e-4", float, "s.lr", problems) == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert coerce(2, float, "s.lr", problems) == 2.0 and isinstance(coerce(2, float, "s.lr", problems), float)
    assert coerce(2020, str, "s.split", problems) == "2020" and coerce(0.5, str, "s.x", problems) == "0.5"
    assert coerce("a", str, "s.x", problems) == "a" and coerce(True, bool, "s.b", problems) is True
    assert coerce("y", Literal["x", "y"], "s.m", problems) == "y"
    assert coerce([1, 2], list[int], "s.l", problems) == [1, 2] and coerce((1,), tuple[int, ...], "s.l", problems) == [1]
    assert coerce({1: 2.5}, dict[str, float], "s.d", problems) == {"1": 2.5}
    assert coerce(None, Optional[int], "s.o", problems) is None and coerce(4, Optional[int], "s.o", problems) == 4
    assert coerce({"k": 3}, Inner, "s.i", problems) == Inner(k=3)
    assert coerce({"k": 3}, Optional[Inner], "s.i", problems) == Inner(k=3)
    assert coerce(1j, complex, "s.c", problems) == 1j  # a type with no rule passes through
    assert coerce(4, Optional[int], "s.o", problems) == 4 and coerce(4, type(None) | int, "s.o", problems) == 4
    assert problems == []


@pytest.mark.parametrize("value, tp, empty, message", [
    (True, int, 0, "s.f must be an integer (got True)"),
    ("3", int, 0, "s.f must be an integer (got '3')"),
    ("fast", float, 0.0, "s.f must be a number (got 'fast')"),
    (False, float, 0.0, "s.f must be a number (got False)"),
    (True, str, "", "s.f must be a string (got True)"),
    (["a"], str, "", "s.f must be a string (got ['a'])"),
    ("abc", list[int], [], "s.f must be a list of an integer (got 'abc')"),
    ([1], dict[str, int], {}, "s.f must be a mapping to an integer (got [1])"),
    ("maybe", bool, "maybe", "s.f must be true/false (got 'maybe')"),
    ("z", Literal["x", "y"], "z", "s.f must be one of 'x', 'y' (got 'z')"),
    ("a", Optional[int], "a", "s.f must be an integer or null (got 'a')"),
])
def test_coerce_a_wrong_type_gives_one_problem_and_an_empty_value(value, tp, empty, message):
    problems: list[str] = []
    assert coerce(value, tp, "s.f", problems) == empty
    assert problems == [message]


def test_coerce_names_each_element_of_a_list_or_mapping():
    problems: list[str] = []
    assert coerce([1, "x", 3], list[int], "s.l", problems) == [1, 0, 3]
    assert coerce({"a": "x"}, dict[str, int], "s.d", problems) == {"a": 0}
    assert coerce({"k": "x"}, Optional[Inner], "s.i", problems) == Inner(k=0)  # the section's own message
    assert problems == ["s.l[1] must be an integer (got 'x')", "s.d.a must be an integer (got 'x')",
                        "s.i.k must be an integer (got 'x')"]


def test_build_dataclass_collects_every_problem_in_order():
    problems: list[str] = []
    built = build_dataclass(Section, {"name": "b", "size": 3, "rate": 0.25, "inner": {"k": 4}, "tags": ["t"]},
                            "s", problems)
    assert problems == [] and built == Section(name="b", size=3, rate=0.25, inner=Inner(k=4), tags=["t"])

    problems = []
    build_dataclass(Section, {"bogus": 1, "size": "x", "inner": {"k": 9}}, "s", problems)
    assert problems == [
        "unknown key s.bogus; known keys: name, rate, size, tags, flag, mode, inner, note, last, ns, doc",
        "s.size must be an integer (got 'x')",
        "s.inner.k must be in [1, 4] (got 9)",
        "s.name is required",
    ]
    problems = []
    build_dataclass(Section, [1], "", problems)  # not a mapping, at the top: named "config"
    assert problems == ["config must be a mapping (got list)", "name is required"]
    problems = []
    built = build_dataclass(Section, {"name": "b", "size": 3}, "s", problems, skip=("name",))  # the caller builds it
    assert problems == [] and built.name == "a" and built.size == 3  # keys after a skipped one still read
    problems = []
    assert build_dataclass(Section, None, "s", problems, skip=("name",)) == Section() and problems == []
    problems = []
    build_dataclass(Section, {"name": "a", "size": True}, "", problems)  # top-level keys are not dotted
    assert problems == ["size must be an integer (got True)"]
    problems = []
    build_dataclass(Section, {"zz": 1}, "", problems, skip=("name",))
    assert problems == ["unknown key zz; known keys: name, rate, size, tags, flag, mode, inner, note, last, ns, doc"]


def test_range_checks_run_only_on_well_typed_values_and_validate_only_on_in_range_ones():
    def check(obj: Any, path: str) -> list[str]:
        calls.append(path)
        return field_problems(obj, path)

    calls: list[str] = []
    problems: list[str] = []
    build_dataclass(Section, {"name": "a", "size": "x", "rate": 5.0}, "s", problems, check=check)
    assert problems == ["s.size must be an integer (got 'x')"] and calls == []  # no range check after a type error
    problems = []
    build_dataclass(Section, {"name": "a", "mode": "y", "size": 9}, "s", problems, check=check)
    assert problems == ["s.size must be in [1, 8] (got 9)"] and calls == ["s"]  # validate() not run
    problems = []
    build_dataclass(Section, {"name": "a", "mode": "y", "size": 6}, "s", problems, check=check)
    assert problems == ["size must not exceed 4 when mode is y"]
    problems = ["an earlier section's problem"]
    build_dataclass(Section, {"name": "a", "mode": "y", "size": 6}, "s", problems)
    assert problems == ["an earlier section's problem", "size must not exceed 4 when mode is y"]  # own problems count


@dataclass
class Holder:
    one: Inner = field(default_factory=Inner)
    maybe: Optional[Inner] = None
    many: list[Inner] = field(default_factory=list)
    by: dict[str, Inner] = field(default_factory=dict)


def test_the_check_given_reaches_every_nested_section():
    def check(obj: Any, path: str) -> list[str]:
        calls.append(path)
        return [f"{path}: k is 3"] if getattr(obj, "k", None) == 3 else []

    calls: list[str] = []
    problems: list[str] = []
    build_dataclass(Holder, {"one": {}, "maybe": {"k": 1}, "many": [{}, {}], "by": {"x": {}}}, "h", problems, check=check)
    assert problems == [] and sorted(calls) == ["h", "h.by.x", "h.many[0]", "h.many[1]", "h.maybe", "h.one"]
    calls = []
    build_dataclass(Holder, {"maybe": {"k": 3}}, "h", problems, check=check)  # the section's own check fails
    assert problems == ["h.maybe: k is 3"]
