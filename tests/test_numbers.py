"""One number grammar (data/numbers.py) for the stream loader and the numeric scorer (issue 20).

Both ways: every accepted form loads and is scored as the number it spells (generated forms, values
computed from the parts, not by the parser), and every rejected form is refused by the loader with
the file and line named.
"""

from __future__ import annotations

import json
import random
from decimal import Decimal
from pathlib import Path

import pytest

from data.errors import DataError
from data.numbers import final_number, number_problem, parse_number
from data.streams import EvalItem, load_stream
from data.streams.templates import render
from eval_and_metrics.scorers.numeric import Numeric, extract_number

STREAM = """name: nums
tasks:
  - name: t
    source: {type: jsonl, path: "{split}.jsonl"}
    scorer: numeric
    train_split: train
    eval_split: test
"""


def accepted_forms(num: int, seed: int = 0) -> list[tuple[str, Decimal]]:
    """Random numbers written in every accepted way, each with its value computed from the parts."""
    rng = random.Random(seed)
    out = []
    for _ in range(num):
        value = rng.choice([0, rng.randrange(10), rng.randrange(1000), rng.randrange(10**4), rng.randrange(10**13)])
        grouped = value >= 1000 and rng.random() < 0.5
        digits = f"{value:,}" if grouped else "0" * rng.choice([0, 0, 0, 1, 2]) + str(value)
        fraction = rng.choice(["", "", f"{rng.randrange(10**rng.randint(1, 4))}"])
        if fraction:
            fraction = fraction.zfill(rng.randint(len(fraction), 5))
        sign = rng.choice(["", "", "-", "+"])
        text = (rng.choice(["", " ", "\t"]) + sign + rng.choice(["", "$"]) + digits
                + ("." + fraction if fraction else "") + rng.choice(["", "", "%"]) + rng.choice(["", " ", "\n"]))
        magnitude = Decimal(value) + (Decimal(f"0.{fraction}") if fraction else 0)
        out.append((text, -magnitude if sign == "-" else magnitude))
    return out


REJECTED = ["1e3", "1E3", "2.5e-2", "1e400", "1_000", "1,23", "1,0000", "12,34,567", "1,000,00", ".5", "5.",
            "1.2.3", "$-5", "--5", "+-5", "1 000", "inf", "-inf", "nan", "NaN", "Infinity", "0x10", "½",
            "\u22125", "\u0661\u0662", "5$", "five", "72 apples", "#### 72", "1/2", "(5)", "5-"]


def write_stream(tmp_path: Path, eval_targets: list[str]) -> Path:
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"prompt": f"train {i}?", "target": str(i)}) + "\n"
                                                  for i in range(3)))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": f"question {i}?", "target": t}) + "\n"
                                                 for i, t in enumerate(eval_targets)))
    (tmp_path / "stream.yaml").write_text(STREAM)
    return tmp_path / "stream.yaml"


def test_every_accepted_form_is_read_as_its_value_alone_in_a_sentence_and_on_an_answer_line() -> None:
    for text, value in accepted_forms(3000):
        assert number_problem(text) is None, text
        assert parse_number(text) == value, text
        assert Decimal(extract_number(text)) == value, text
        assert Decimal(extract_number(f"She had 3, spent 2 and pays {text.strip()}.")) == value, text
        assert Decimal(extract_number(f"12 + 3 = 15 and then\n#### {text.strip()}\n")) == value, text


def test_every_accepted_form_loads_and_is_scored_as_the_same_number(tmp_path: Path) -> None:
    forms = accepted_forms(200, seed=1)
    stream = load_stream(str(write_stream(tmp_path, [text for text, _ in forms])))
    items = stream.tasks[0].eval
    assert len(items) == len(forms)
    scorer = Numeric()
    assert scorer.check(items) == []
    for item, (_, value) in zip(items, forms, strict=True):
        right = scorer.score_generation(item, f"The total is {value:f} dollars.\n")
        wrong = scorer.score_generation(item, f"The total is {value + 1:f} dollars.\n")
        assert (right["numeric_match"], wrong["numeric_match"]) == (1.0, 0.0), (item.target, right, wrong)
        assert Decimal(right["target"]) == value


def test_every_rejected_form_is_refused_by_the_loader_naming_the_file_and_line(tmp_path: Path) -> None:
    for text in REJECTED:
        assert number_problem(text) is not None and parse_number(text) is None, text
    for start in range(0, len(REJECTED), 10):  # a file reports at most 10 record problems
        chunk = REJECTED[start:start + 10]
        with pytest.raises(DataError) as info:
            load_stream(str(write_stream(tmp_path, chunk)))
        problems = info.value.problems
        assert len(problems) == len(chunk), problems
        for lineno, (text, problem) in enumerate(zip(chunk, problems, strict=True), start=1):
            assert problem.startswith(f"{tmp_path / 'test.jsonl'}:{lineno}: task 't': format.target must render "
                                      "a number for the numeric scorer: "), problem


def test_the_issue_examples(tmp_path: Path) -> None:
    """'1e3' loaded as 1000 and was scored as 3, '1_000' as 000, '1,23' as 23, and '$5' was refused."""
    with pytest.raises(DataError) as info:
        load_stream(str(write_stream(tmp_path, ["1e3", "1_000", "1,23"])))
    assert [p.split("numeric scorer: ", 1)[1] for p in info.value.problems] == [
        "'1e3' is scientific notation, which the scorer does not read (1e3 is 1 and 3); write 1000",
        "'1_000' has '_' digit separators; write 1000",
        "'1,23' is ambiguous: a comma only separates groups of three digits (1,000); write a decimal point (1.23) "
        "or no comma"]
    items = load_stream(str(write_stream(tmp_path, ["$5", "1000", "$72"]))).tasks[0].eval
    rows = [Numeric().score_generation(item, generation)
            for item, generation in zip(items, ["It costs 5 coins.", "1000", "$72.00."], strict=True)]
    assert [(r["target"], r["numeric_match"]) for r in rows] == [("5", 1.0), ("1000", 1.0), ("72", 1.0)]
    # in a generation, what is not one number reads as lm-eval's gsm8k filters read it
    assert [extract_number(g) for g in ["1e3", "1_000", "1,23", "Weights 1,2,3", "48-24"]] == ["3", "000", "23",
                                                                                             "3", "-24"]


def test_the_final_number_filter_reads_a_solution_as_the_scorer_does() -> None:
    for solution, answer in [("3 + 4 = 7\n#### 1,007", "1007"), ("Cost $1,234.50 in all.\n#### $1,234.50", "1234.50"),
                             ("#### 72\n#### 99", "72"), ("####\n12", "12"), ("so -3.", "-3"),
                             ("It is 50% of them, 40 in all.", "40")]:
        filtered = render("{a|final_number}", {"a": solution})
        assert filtered == answer == final_number(solution) == extract_number(solution), solution
        assert number_problem(filtered) is None
