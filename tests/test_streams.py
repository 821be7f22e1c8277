"""Task streams: the stream file format, every source, seeded splits, the bad-input errors, the presets."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import textwrap
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from data.errors import DataError
from data.fields import needs_constraint
from data.streams import (
    PRESET_DIR,
    SOURCES,
    EvalItem,
    Stream,
    TrainItem,
    list_presets,
    load_stream,
    read_stream_spec,
    validate_stream_file,
)
from data.streams.build import seeded_split, split_key
from data.streams.config import FormatConfig, SourceConfig, SplitConfig, StreamConfig, TaskConfig
from data.streams.rules import rule_of
from data.streams.sources.generated import GeneratedOptions, generate_items
from data.streams.sources.packaged import humaneval_file, mmlu_file, mmlu_subjects
from data.streams.templates import TemplateError, render

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "streams"
LOCAL = FIXTURES / "local.yaml"
HUB_SHAPED = FIXTURES / "hub_shaped"  # a few invented rows per hub data set, in the hub's own columns


@pytest.fixture(autouse=True)
def _hf_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets caches what load_dataset builds; keep that out of the user's ~/.cache during tests."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-cache")


def write_stream(tmp_path: Path, text: str, files: dict[str, str] | None = None) -> Path:
    for name, content in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    path = tmp_path / "stream.yaml"
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def stream_bytes(stream: Stream) -> bytes:
    return json.dumps(stream.to_json(), sort_keys=True, ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------------------
# Registry and declarations


def test_sources_registry_is_explicit_and_documented() -> None:
    assert list(SOURCES) == ["jsonl", "csv", "trace", "dialogue_csv", "hf", "mmlu_packaged", "humaneval_packaged",
                             "generated", "lm_eval"]
    docs = (REPO / "docs" / "streams.md").read_text()
    for key, source in SOURCES.items():
        assert source.name == key
        assert f"`{key}`" in docs, f"docs/streams.md does not document source {key}"


def _sections() -> list[type]:
    return [StreamConfig, TaskConfig, SplitConfig, FormatConfig, SourceConfig,
            *(s.options_cls for s in SOURCES.values())]


def test_every_stream_config_field_declares_its_valid_values() -> None:
    for cls in _sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            is_section = dataclasses.is_dataclass(tp) or (inner and dataclasses.is_dataclass(inner[0]))
            if is_section or tp is Any or not needs_constraint(tp):
                continue
            assert rule_of(cls, f.name) is not None, f"{cls.__name__}.{f.name} declares no valid values"


# ---------------------------------------------------------------------------------------------
# Sources on local files


def test_every_file_source_loads_the_local_fixtures() -> None:
    stream = load_stream(str(LOCAL))
    assert stream.task_names == ["qa", "mc", "stance", "gsm", "mirrek", "osska"]
    tasks = {t.name: t for t in stream.tasks}

    qa = tasks["qa"]  # jsonl, {split} path, standard schema, a blank line and an extra field in the file
    assert [(t.prompt, t.completion) for t in qa.train][0] == ("Q: What is the capital of Veltrassa?\nA:", " Kormoth")
    assert len(qa.train) == 4 and len(qa.eval) == 2 and qa.meta["read"]["train"]["num_blank_lines"] == 1

    mc = tasks["mc"]  # csv, choice templates, gold letters, seeded split of one file
    assert len(mc.train) + len(mc.eval) == 6 and len(mc.eval) == 2
    for item in mc.eval:
        assert len(item.choices) == 4 and item.delimiter == " " and item.target == " " + item.choices[item.gold]

    stance = tasks["stance"]  # TRACE layout: the answer appended as is (format overrides only the target)
    assert stance.eval[0].target == " favor" and stance.eval[0].prompt.endswith("Stance:")

    gsm = tasks["gsm"]  # hf on a local directory shaped like the hub's GSM8K
    assert [e.target for e in gsm.eval] == ["15", "28"]
    assert gsm.train[2].completion.endswith("#### 1,000")

    mirrek, osska = tasks["mirrek"], tasks["osska"]  # dialogue: one speaker each, by name and by rank
    assert mirrek.meta["read"]["all"]["speaker"] == "Mirrek" and osska.meta["read"]["all"]["speaker"] == "Osska"
    assert osska.meta["read"]["all"]["num_empty_dropped"] == 1
    for task, num_utterances in ((mirrek, 8), (osska, 6)):
        counts = task.meta["counts"]
        assert len(task.train) + len(task.eval) + counts["eval"].get("leaked_dropped", 0) == num_utterances
    assert all(t.prompt == "" for t in mirrek.train) and all(e.prompt == "" for e in mirrek.eval)
    json.dumps(stream.to_json())  # the whole stream, meta included, is plain JSON


def test_hf_source_goes_through_load_dataset_for_local_dirs_and_data_files(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls: list[tuple[Any, dict[str, Any]]] = []
    real = datasets.load_dataset

    def spy(path: Any, **kwargs: Any) -> Any:
        calls.append((path, kwargs))
        return real(path, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    gsm = FIXTURES / "hub_gsm8k"
    path = write_stream(tmp_path, f"""
        name: hf-both-ways
        tasks:
          - name: by_dir
            source: {{type: hf, path: "{gsm}", fields: {{question: str, answer: str}}}}
            scorer: numeric
            train_split: train
            eval_split: test
            format: {{prompt: "Q: {{question}}\\nA:", target: " {{answer|final_number}}", completion: " {{answer}}"}}
          - name: by_files
            source:
              type: hf
              path: json
              data_files: {{train: "{gsm}/train.jsonl", test: "{gsm}/test.jsonl"}}
              fields: {{question: str, answer: str}}
            scorer: numeric
            train_split: train
            eval_split: test
            format: {{prompt: "Question: {{question}}\\nAnswer:", target: " {{answer|final_number}}"}}
    """)
    stream = load_stream(str(path))
    assert [c[0] for c in calls] == [str(gsm), str(gsm), "json", "json"]
    assert calls[2][1]["split"] == "train" and calls[2][1]["data_files"]["test"] == f"{gsm}/test.jsonl"
    by_dir, by_files = stream.tasks
    assert [e.target for e in by_dir.eval] == [e.target for e in by_files.eval] == ["15", "28"]
    # No completion template: the training text is the target, as rendered (" 17", not the solution).
    assert by_files.train[0].completion == " 17" and by_dir.train[0].completion.endswith("#### 17")


LM_EVAL_TASKS = {
    # lm-eval task YAMLs over local JSON Lines files (dataset_path json + data_files), so no hub is needed
    "clkit_stream_qa": """
        task: clkit_stream_qa
        dataset_path: json
        dataset_kwargs: {{data_files: {{train: {dir}/qa_train.jsonl, validation: {dir}/qa_val.jsonl}}}}
        training_split: train
        validation_split: validation
        output_type: generate_until
        doc_to_text: "Q: {{{{question}}}}\\nA:"
        doc_to_target: "{{{{answer}}}}"
        metric_list: [{{metric: exact_match}}]
    """,
    "clkit_stream_mc": """
        task: clkit_stream_mc
        dataset_path: json
        dataset_kwargs: {{data_files: {{train: {dir}/mc_train.jsonl, test: {dir}/mc_test.jsonl}}}}
        training_split: train
        test_split: test
        output_type: multiple_choice
        description: "Sums.\\n\\n"
        doc_to_text: "{{{{question}}}}"
        doc_to_target: "{{{{label}}}}"
        doc_to_choice: "{{{{choices}}}}"
        metric_list: [{{metric: acc}}]
    """,
}


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_lm_eval_source_renders_a_task_through_its_doc_to_functions(tmp_path: Path) -> None:
    if importlib.util.find_spec("lm_eval") is None:
        if os.environ.get("CI") == "true":  # .ci/run installs the lm-eval extra: CI must run this test
            pytest.fail("CI=true but lm-eval is missing: uv sync --extra lm-eval", pytrace=False)
        pytest.skip("lm-eval is not installed (uv sync --extra lm-eval)")
    tasks = tmp_path / "lm_tasks"
    tasks.mkdir()
    for name, text in LM_EVAL_TASKS.items():
        (tasks / f"{name}.yaml").write_text(textwrap.dedent(text.format(dir=tasks)).lstrip())
    (tasks / "qa_train.jsonl").write_text(_jsonl([{"question": f"capital of Veltra {i}?", "answer": f"Kor{i}"}
                                                  for i in range(4)]))
    (tasks / "qa_val.jsonl").write_text(_jsonl([{"question": "capital of Osska?", "answer": "Mirrek"}]))
    (tasks / "mc_train.jsonl").write_text(_jsonl([{"question": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2)],
                                                   "label": 0} for i in range(3)]))
    (tasks / "mc_test.jsonl").write_text(_jsonl([{"question": "2 + 2 =", "choices": ["3", "4"], "label": 1}]))
    path = write_stream(tmp_path, """
        name: lm
        tasks:
          - name: qa
            source: {type: lm_eval, task: clkit_stream_qa, include_path: lm_tasks, include_defaults: false}
            scorer: exact_match
            train_split: train
            eval_split: validation
          - name: mc
            source: {type: lm_eval, task: clkit_stream_mc, include_path: lm_tasks, include_defaults: false}
            scorer: multiple_choice
            train_split: train
            eval_split: test
    """)
    assert validate_stream_file(path) == []
    stream = load_stream(str(path))
    qa, mc = stream.tasks
    assert [(t.prompt, t.completion) for t in qa.train][:1] == [("Q: capital of Veltra 0?\nA:", " Kor0")]
    assert len(qa.train) == 4 and [(e.prompt, e.target) for e in qa.eval] == [("Q: capital of Osska?\nA:", " Mirrek")]
    # lm-eval's zero-shot context: the description, then doc_to_text; the choices apart from the delimiter
    assert len(mc.train) == 3 and (mc.train[0].prompt, mc.train[0].completion) == ("Sums.\n\n0 + 1 =", " 1")
    (item,) = mc.eval
    assert (item.prompt, item.choices, item.delimiter, item.gold, item.target) == (
        "Sums.\n\n2 + 2 =", ("3", "4"), " ", 1, " 4")
    assert qa.meta["read"]["train"]["output_type"] == "generate_until"
    assert mc.meta["read"]["test"]["target_delimiter"] == " " and mc.meta["read"]["test"]["description"] is True

    few = tasks / "clkit_stream_mc.yaml"
    few.write_text(few.read_text() + "num_fewshot: 2\n")
    with pytest.raises(DataError, match=r"lm-eval task 'clkit_stream_mc' asks for num_fewshot=2: streams score "
                                        r"zero-shot prompts only"):
        load_stream(str(path))
    few.write_text(few.read_text().replace("num_fewshot: 2\n", ""))

    bad = write_stream(tmp_path, (tmp_path / "stream.yaml").read_text().replace("eval_split: test", "eval_split: validation"))
    with pytest.raises(DataError, match=r"lm-eval task 'clkit_stream_mc' has no validation split; it has: train, test"):
        load_stream(str(bad))


def test_lm_eval_source_without_lm_eval_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed
    path = write_stream(tmp_path, """
        name: lm
        tasks:
          - name: qa
            source: {type: lm_eval, task: anything}
            scorer: exact_match
            train_split: train
            eval_split: validation
    """)
    assert validate_stream_file(path) == []  # validation never imports lm-eval
    with pytest.raises(DataError, match=r"source lm_eval needs lm-eval, an optional extra: run `uv sync --extra lm-eval`"):
        load_stream(str(path))


def test_packaged_mmlu_loads_offline_with_the_right_counts() -> None:
    file = mmlu_file()
    subjects = mmlu_subjects()
    assert len(file.records) == 14_042 and file.num_header_rows == 2
    assert len(subjects) == 57 and sum(subjects.values()) == 14_042
    assert subjects["abstract_algebra"] == 100 and subjects["anatomy"] == 135
    stream = load_stream("mmlu-packaged")
    algebra, anatomy = stream.tasks
    assert (len(algebra.train), len(algebra.eval)) == (80, 20)
    # every question is on exactly one side (exact duplicates, if any, once and counted)
    assert len(anatomy.train) + len(anatomy.eval) + anatomy.meta["counts"]["train"]["duplicates_dropped"] \
        + anatomy.meta["counts"]["eval"]["duplicates_dropped"] == 135
    item = algebra.eval[0]
    assert item.choices == ("A", "B", "C", "D") and item.delimiter == " "
    assert item.target == " " + item.choices[item.gold]
    assert item.prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert "seeded disjoint split" in algebra.meta["read"]["test"]["note"]


def test_packaged_mmlu_strips_the_question_as_lm_evals_template(tmp_path: Path) -> None:
    # lm-eval's mmlu doc_to_text is "{{question.strip()}}\nA. ...": 963 of the 14,042 questions have outer
    # whitespace (business_ethics: 8 of 100), which the prompt must not carry
    assert sum(r["question"] != r["question"].strip() for _, r in mmlu_file().records) == 963
    path = write_stream(tmp_path, """
        name: mmlu-ethics
        tasks:
          - {name: ethics, source: {type: mmlu_packaged, subject: business_ethics}, scorer: multiple_choice,
             eval_split: test}
    """)
    (task,) = load_stream(str(path)).tasks
    padded = [r for _, r in mmlu_file().records
              if r["topic"] == "business ethics" and r["question"] != r["question"].strip()]
    assert len(padded) == 8
    prompts = {e.prompt for e in task.eval}
    for rec in padded:
        question = (f"\n\n{rec['question'].strip()}\nA. {rec['answer_a']}\nB. {rec['answer_b']}\n"
                    f"C. {rec['answer_c']}\nD. {rec['answer_d']}\nAnswer:")
        assert sum(p.endswith(question) for p in prompts) == 1, rec["question"]


def test_packaged_humaneval_loads_offline_with_164_problems(tmp_path: Path) -> None:
    _, _, records = humaneval_file()
    assert len(records) == 164
    path = write_stream(tmp_path, """
        name: humaneval-probe
        tasks:
          - {name: humaneval, source: {type: humaneval_packaged}, scorer: code_pass_at_1, eval_split: test}
    """)
    (task,) = load_stream(str(path)).tasks
    assert len(task.eval) == 164 and task.train == () and task.meta["split"]["eval_only"]
    first = task.eval[0]
    assert first.id == "humaneval/test/HumanEval/0" and first.entry_point == "has_close_elements"
    assert "def check(candidate)" in first.tests and first.target == records[0]["canonical_solution"]
    halves = load_stream("humaneval-packaged").tasks[0]
    assert (len(halves.train), len(halves.eval)) == (82, 82)
    assert not {t.prompt for t in halves.train} & {e.prompt for e in halves.eval}


def test_packaged_humaneval_as_held_out_text_needs_no_format(tmp_path: Path) -> None:
    """A perplexity task on HumanEval scores the whole program; the source's code-only keys (tests,
    entry_point) are not pushed on it, where they were refused as if the task had written them."""
    _, _, records = humaneval_file()
    path = write_stream(tmp_path, """
        name: code-text
        tasks:
          - {name: code, source: {type: humaneval_packaged}, scorer: perplexity, eval_split: test}
    """)
    (task,) = load_stream(str(path)).tasks
    first = task.eval[0]
    assert first.prompt == "" and first.target == records[0]["prompt"] + records[0]["canonical_solution"]
    assert first.tests == "" and first.entry_point == ""
    (real,) = [t for t in load_stream("real-domains").tasks if t.name == "code"]
    assert (len(real.train), len(real.eval)) == (48, 82) and real.loss_on == "all"


# ---------------------------------------------------------------------------------------------
# The generated stream


def test_generated_stream_is_byte_identical_per_seed_and_differs_across_seeds() -> None:
    first, again = load_stream("multidomain-synthetic", seed=0), load_stream("multidomain-synthetic", seed=0)
    other = load_stream("multidomain-synthetic", seed=1)
    assert stream_bytes(first) == stream_bytes(again) and first.fingerprint == again.fingerprint
    assert stream_bytes(first) != stream_bytes(other)
    for a, b in zip(first.tasks, other.tasks):
        assert a.train != b.train and a.eval != b.eval, a.name
    assert [(len(t.train), len(t.eval)) for t in first.tasks] == [(48, 16)] * 4


def test_generated_items_are_correct_and_learnable() -> None:
    stream = load_stream("multidomain-synthetic")
    math, code, mc, style = stream.tasks
    for train, item in zip(math.train, math.eval):
        assert re.findall(r"= (\d+)", train.completion.splitlines()[0])[-1] == train.completion.rsplit(" ", 1)[1]
        assert item.target.isdigit() and item.prompt.startswith("Question: ") and item.prompt.endswith("\nAnswer:")
    for item in code.eval:
        # Our own generated, constant templates: running them checks the generator, not user code.
        scope: dict[str, Any] = {}
        exec(item.prompt + item.target + "\n" + item.tests, scope)  # noqa: S102
        scope["check"](scope[item.entry_point])
        for expected in re.findall(r"== (.*)$", item.tests, re.MULTILINE):
            # a constant function cannot pass: the asserts expect at least two different values
            with pytest.raises(AssertionError):
                scope["check"](lambda *a, value=eval(expected): value)  # noqa: S307
    assert {len(e.choices) for e in mc.eval} == {4} and all(e.target == e.delimiter + e.choices[e.gold] for e in mc.eval)
    golds = [e.gold for e in mc.eval]
    assert len(set(golds)) >= 3  # the gold position varies, so "always A" is not learnable
    for register in ("Weather for ", "To make ", " of the voyage.", " Rovers beat ", "Notice to the residents"):
        assert any(register in t.completion for t in style.train), register
    assert len({e.target for e in style.eval}) == len(style.eval)


def test_generated_domains_capacity_error_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"domain code: only \d+ distinct items exist for these options, 20001 asked"):
        generate_items(GeneratedOptions(domain="code", num_train=20_000, num_eval=1), 0)


# ---------------------------------------------------------------------------------------------
# Splits and caps


def test_seeded_split_is_disjoint_deterministic_and_keeps_equal_prompts_together() -> None:
    a = [t for t in load_stream("mmlu-packaged", seed=0).tasks]
    b = [t for t in load_stream("mmlu-packaged", seed=0).tasks]
    c = [t for t in load_stream("mmlu-packaged", seed=5).tasks]
    for x, y, z in zip(a, b, c):
        assert x.eval == y.eval and x.train == y.train
        assert {e.id for e in x.eval} != {e.id for e in z.eval}
        assert not {t.prompt for t in x.train} & {e.prompt for e in x.eval}
    pairs = [(TrainItem(f"q{i % 7}", " a"), EvalItem(f"id{i}", f"q{i % 7}", " a")) for i in range(40)]
    train, held = seeded_split(pairs, "generate", 0.3, "seed")
    assert {split_key(e, "generate") for _, e in train}.isdisjoint({split_key(e, "generate") for _, e in held})
    assert len(train) + len(held) == 40 and seeded_split(pairs, "generate", 0.3, "seed") == (train, held)


def test_caps_are_a_seeded_sample_not_the_first_rows(tmp_path: Path) -> None:
    # A training file sorted by label, as hub training splits often are.
    rows = [{"prompt": f"Text {i}:", "target": " World" if i < 50 else " Sports"} for i in range(100)]
    path = write_stream(tmp_path, """
        name: capped
        tasks:
          - name: topics
            source: {type: jsonl, path: "topics/{split}.jsonl"}
            scorer: exact_match
            train_split: train
            eval_split: test
            max_train: 20
    """, {"topics/train.jsonl": "\n".join(json.dumps(r) for r in rows),
          "topics/test.jsonl": json.dumps({"prompt": "Text x:", "target": " World"})})
    (task,) = load_stream(str(path)).tasks
    assert len(task.train) == 20 and {t.completion for t in task.train} == {" World", " Sports"}
    assert task.meta["counts"]["train"]["capped_from"] == 100
    order = [int(t.prompt.split()[1][:-1]) for t in task.train]
    assert order == sorted(order)  # kept in source order
    (other,) = load_stream(str(path), seed=1).tasks
    assert other.train != task.train


def test_orders_pick_alternative_sequences_and_bad_orders_are_refused(tmp_path: Path) -> None:
    assert load_stream(str(LOCAL), order=1).task_names == ["osska", "mirrek", "gsm", "stance", "mc", "qa"]
    with pytest.raises(DataError, match=r"order 2 does not exist; valid: 0\.\.1"):
        load_stream(str(LOCAL), order=2)
    text = LOCAL.read_text().replace("[osska, mirrek, gsm, stance, mc, qa]", "[osska, osska, gsm, stance, mc, qux]")
    bad = tmp_path / "local.yaml"
    bad.write_text(text)
    (problem,) = validate_stream_file(bad)
    assert re.search(r"local\.yaml:\d+: orders\[1\] must list every task exactly once \(missing qa, mirrek; "
                     r"unknown qux; repeated osska\)", problem)


# ---------------------------------------------------------------------------------------------
# Bad input: a DataError with one problem per line, each naming file, line and field


JSONL_TASK = """
    name: bad
    tasks:
      - name: t
        source: {type: jsonl, path: "t/{split}.jsonl"}
        scorer: exact_match
        train_split: train
        eval_split: test
"""
GOOD_TEST = '{"prompt": "Q: held out?", "target": " yes"}\n'


@pytest.mark.parametrize("train, expected", [
    ('{"prompt": "Q: a?", "target": " b"}\n{"prompt": "Q: c?", "target": " d"}\n{"prompt": "Q: e?" "target"}\n',
     r"t/train\.jsonl:3: malformed JSON at column \d+"),
    ('{"prompt": "Q: a?", "target": " b"}\n{"prompt": "Q: c?"}\n',
     r"t/train\.jsonl:2: missing field 'target' \(declared str\)"),
    ('{"prompt": "Q: a?", "target": 7}\n', r"t/train\.jsonl:1: field 'target' must be str \(got int 7\)"),
    ('["Q: a?", " b"]\n', r"t/train\.jsonl:1: a record must be a JSON object \(got list\)"),
    ('\n\n', r"task 't' has no training items \(read 0 records\)"),
], ids=["malformed-line", "missing-field", "wrong-type", "not-an-object", "empty-task"])
def test_bad_jsonl_records_name_file_line_and_field(tmp_path: Path, train: str, expected: str) -> None:
    path = write_stream(tmp_path, JSONL_TASK, {"t/train.jsonl": train, "t/test.jsonl": GOOD_TEST})
    with pytest.raises(DataError, match=expected):
        load_stream(str(path))


def test_an_empty_eval_split_is_refused(tmp_path: Path) -> None:
    path = write_stream(tmp_path, JSONL_TASK, {"t/train.jsonl": GOOD_TEST.replace("held out", "a"),
                                               "t/test.jsonl": ""})
    with pytest.raises(DataError, match=r"stream\.yaml:3: task 't' has no eval items \(read 0 records\)"):
        load_stream(str(path))


@pytest.mark.parametrize("edit, expected", [
    (("type: jsonl", "type: jsonx"),
     r"stream\.yaml:4: tasks\[0\]\.source\.type 'jsonx' is not a source; valid: jsonl, csv, trace, dialogue_csv, hf, "
     r"mmlu_packaged, humaneval_packaged, generated"),
    (("scorer: exact_match", "scorer: bleu"), r"stream\.yaml:5: tasks\[0\]\.scorer 'bleu' is not a scorer; valid: "),
    (("eval_split: test", "eval_split: train"),
     r"stream\.yaml:7: tasks\[0\]\.eval_split 'train' is also the train_split"),
    (('path: "t/{split}.jsonl"', 'path: "t/{split}.jsonl", colour: red'),
     r"stream\.yaml:4: unknown key tasks\[0\]\.source\.colour; known keys: fields, labels, path"),
    (("name: t", "name: ../t"), r"stream\.yaml:3: tasks\[0\]\.name must be a name matching"),
    (("    scorer: exact_match\n", "    scorer: exact_match\n    scorer: token_f1\n"),
     r"stream\.yaml:6: tasks\[0\]\.scorer is given twice \(lines 5 and 6\); YAML would keep only the last"),
    (("name: bad", "name: bad\nseed: 3"), r"stream\.yaml:2: unknown key seed; known keys: name, tasks, orders"),
    (("    eval_split: test\n", "    eval_split: test\n    format: {prompt: \"{questoin}\"}\n"),
     r"stream\.yaml:8: tasks\[0\]\.format\.prompt \{questoin\} is not a field of this source; its fields: "
     r"prompt, target"),
    (("    eval_split: test\n", "    eval_split: test\n    max_train: -1\n"),
     r"stream\.yaml:8: tasks\[0\]\.max_train must be in \[0, 10000000\] \(got -1\)"),
    (("    eval_split: test\n", "    eval_split: test\n    format: {choices: prompt}\n"),
     r"stream\.yaml:8: tasks\[0\]\.format\.choices applies to multiple_choice scorers only, not to a generate scorer"),
    (("tasks:", "orders: [[t]]\ntasks:\n  - name: t\n    source: {type: generated}\n    scorer: numeric\n"
                "    train_split: train\n    eval_split: test"),
     r"tasks\[1\]\.name 't' repeats the name of tasks\[0\]"),
], ids=["unknown-source", "unknown-scorer", "same-split", "unknown-option", "path-as-name", "repeated-key",
        "unknown-top-level-key", "unknown-field",
        "out-of-range", "choices-on-generate", "duplicate-task"])
def test_config_problems_are_found_offline_with_file_line_and_field(tmp_path: Path, edit: tuple[str, str],
                                                                    expected: str) -> None:
    text = textwrap.dedent(JSONL_TASK).replace(*edit)
    path = write_stream(tmp_path, text)
    problems = validate_stream_file(path)
    assert problems and any(re.search(expected, p) for p in problems), problems
    assert all(p.startswith(str(path)) for p in problems)
    with pytest.raises(DataError, match=expected):
        load_stream(str(path))


@pytest.mark.parametrize("edit, files, expected", [
    ((("scorer: exact_match", "scorer: bleu"), ("    eval_split: test\n", "    eval_split: test\n    max_train: -1\n")),
     {}, [r"stream\.yaml:5: tasks\[0\]\.scorer 'bleu' is not a scorer",
          r"stream\.yaml:8: tasks\[0\]\.max_train must be in \[0, 10000000\] \(got -1\)"]),
    ((), {"t/train.jsonl": '{"prompt": "Q: a?", "target": 7}\n{"prompt": "Q: c?"}\n', "t/test.jsonl": GOOD_TEST},
     [r"t/train\.jsonl:1: field 'target' must be str \(got int 7\)",
      r"t/train\.jsonl:2: missing field 'target' \(declared str\)"]),
], ids=["config", "records"])
def test_the_cli_prints_one_line_per_stream_problem_and_writes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: tuple[tuple[str, str], ...], files: dict[str, str],
        expected: list[str]) -> None:
    from training import cli  # the user's view of a bad stream file: exit 2, one `error:` line per problem

    text = textwrap.dedent(JSONL_TASK)
    for old, new in edit:
        text = text.replace(old, new)
    path = write_stream(tmp_path, text, files)
    root = tmp_path / "runs"
    code = cli.main(["--mode", "synthetic", "--method", "lora", "--stream", str(path), "--run-root", str(root),
                     "--set", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == len(expected), lines
    assert all(line.startswith(f"error: {tmp_path}") for line in lines), lines
    assert all(sum(bool(re.search(pattern, line)) for line in lines) == 1 for pattern in expected), lines
    assert not root.exists()


def test_unknown_mmlu_subject_lists_the_valid_ones(tmp_path: Path) -> None:
    path = write_stream(tmp_path, """
        name: mmlu
        tasks:
          - name: algebra
            source: {type: mmlu_packaged, subject: abstract_algebera}
            scorer: multiple_choice
            split: {eval_fraction: 0.2}
    """)
    (problem,) = validate_stream_file(path)
    assert re.search(r"stream\.yaml:4: tasks\[0\]\.source\.subject 'abstract_algebera' is not an MMLU subject; "
                     r"valid: all, abstract_algebra, anatomy, astronomy, .*world_religions$", problem)
    path.write_text(path.read_text().replace("split: {eval_fraction: 0.2}",
                                             "train_split: train\n    eval_split: test"))
    problems = validate_stream_file(path)
    expected = "train_split 'train': source mmlu_packaged has only the split(s) test; use split:"
    assert any(expected in p for p in problems), problems


def test_csv_without_the_expected_columns_is_refused(tmp_path: Path) -> None:
    path = write_stream(tmp_path, """
        name: csvs
        tasks:
          - name: t
            source: {type: csv, path: t.csv, fields: {question: str, answer: str}}
            scorer: exact_match
            split: {eval_fraction: 0.5}
            format: {prompt: "{question}", target: " {answer}"}
    """, {"t.csv": "question,answr\nWhat?,this\nWhy?,that\n"})
    with pytest.raises(DataError, match=r"t\.csv:1: missing column\(s\) answer \(declared in fields:\); the header "
                                        r"has: 'question', 'answr'"):
        load_stream(str(path))


def test_dialogue_csv_errors_name_the_file_and_the_speakers(tmp_path: Path) -> None:
    task = """
        name: d
        tasks:
          - {name: t, source: {type: dialogue_csv, path: d.csv, speaker: Nobody}, scorer: perplexity,
             split: {eval_fraction: 0.5}}
    """
    path = write_stream(tmp_path, task, {"d.csv": ",who,text\n0,A,hello there\n"})
    with pytest.raises(DataError, match=r"d\.csv:1: missing column\(s\) speaker \(the dialogue layout is "
                                        r"',speaker,text'\)"):
        load_stream(str(path))
    (tmp_path / "d.csv").write_text(",speaker,text\n0,A,hello there\n1,B,good morning\n2,A,and again\n")
    with pytest.raises(DataError, match=r"source\.speaker 'Nobody' has no utterances; speakers by number of "
                                        r"utterances: A \(2\), B \(1\)"):
        load_stream(str(path))


def test_trace_records_are_checked_with_their_line(tmp_path: Path) -> None:
    path = write_stream(tmp_path, """
        name: trace
        tasks:
          - {name: t, source: {type: trace, path: "t/{split}.json"}, scorer: exact_match, train_split: train,
             eval_split: test}
    """, {"t/train.json": '[\n  {"prompt": "a", "answer": "b"},\n  {"prompt": "c"}\n]\n',
          "t/test.json": '[{"prompt": "x", "answer": "y"}]'})
    with pytest.raises(DataError, match=r"t/train\.json:3 \(element 1\): missing field 'answer'"):
        load_stream(str(path))
    (tmp_path / "t/train.json").write_text('{"prompt": "a", "answer": "b"}')
    with pytest.raises(DataError, match=r"t/train\.json:1: must be a JSON list"):
        load_stream(str(path))


def test_hf_missing_column_and_bad_label_names_are_refused(tmp_path: Path) -> None:
    path = write_stream(tmp_path, f"""
        name: hf
        tasks:
          - name: t
            source: {{type: hf, path: "{FIXTURES / 'hub_gsm8k'}", fields: {{question: str, solution: str}}}}
            scorer: exact_match
            train_split: train
            eval_split: test
            format: {{prompt: "{{question}}", target: " {{solution}}"}}
    """)
    with pytest.raises(DataError, match=r"hub_gsm8k\[train\]: missing column\(s\) solution \(declared in fields:\); "
                                        r"the dataset has: answer, question"):
        load_stream(str(path))


def test_numeric_targets_must_be_numbers(tmp_path: Path) -> None:
    path = write_stream(tmp_path, f"""
        name: gsm
        tasks:
          - name: t
            source: {{type: hf, path: json, data_files: {{train: "{FIXTURES}/hub_gsm8k/train.jsonl",
                                                          test: "{FIXTURES}/hub_gsm8k/test.jsonl"}},
                      fields: {{question: str, answer: str}}}}
            scorer: numeric
            train_split: train
            eval_split: test
            format: {{prompt: "{{question}}", target: " {{answer}}"}}
    """)
    with pytest.raises(DataError, match=r"\[train\] row 0: task 't': format\.target must render a number for the "
                                        r"numeric scorer: .*\{answer\|final_number\}"):
        load_stream(str(path))


def test_unset_environment_variable_in_a_path_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLKIT_DIALOGUE_CSV", raising=False)
    with pytest.raises(DataError, match="needs the environment variable CLKIT_DIALOGUE_CSV, which is not set"):
        load_stream("dialogue-speakers")
    csv_text = ",speaker,text\n" + "".join(f"{i},{'ABC'[i % 3]},utterance number {i} of the scene\n" for i in range(60))
    (tmp_path / "talk.csv").write_text(csv_text)
    monkeypatch.setenv("CLKIT_DIALOGUE_CSV", str(tmp_path / "talk.csv"))
    stream = load_stream("dialogue-speakers")
    assert [t.meta["read"]["all"]["speaker"] for t in stream.tasks] == ["A", "B", "C"]


# ---------------------------------------------------------------------------------------------
# Leakage


LEAK = """
    name: leak
    tasks:
      - name: first
        source: {type: jsonl, path: "a/{split}.jsonl"}
        scorer: exact_match
        train_split: train
        eval_split: test
      - name: second
        source: {type: jsonl, path: "b/{split}.jsonl"}
        scorer: exact_match
        train_split: train
        eval_split: test
"""


def _qa(*pairs: tuple[str, str]) -> str:
    return "".join(json.dumps({"prompt": p, "target": t}) + "\n" for p, t in pairs)


def test_an_eval_item_that_is_a_training_item_of_its_task_is_refused(tmp_path: Path) -> None:
    path = write_stream(tmp_path, LEAK, {
        "a/train.jsonl": _qa(("Q: one?", " 1"), ("Q: two?", " 2")),
        "a/test.jsonl": _qa(("Q: two?", " 2"), ("Q: three?", " 3")),
        "b/train.jsonl": _qa(("Q: four?", " 4")), "b/test.jsonl": _qa(("Q: five?", " 5"))})
    with pytest.raises(DataError, match=r"stream\.yaml:3: task 'first': 1 eval item\(s\) also occur in training data, "
                                        r"first first/test/test\.jsonl:1 \(training item 1 of task 'first'\)"):
        load_stream(str(path))


def test_an_eval_item_trained_by_another_task_is_refused_or_dropped_and_counted(tmp_path: Path) -> None:
    files = {"a/train.jsonl": _qa(("Q: one?", " 1")), "a/test.jsonl": _qa(("Q: two?", " 2")),
             # the same question with other whitespace is the same item
             "b/train.jsonl": _qa(("Q:  two?", " 2")), "b/test.jsonl": _qa(("Q: five?", " 5"))}
    path = write_stream(tmp_path, LEAK, files)
    with pytest.raises(DataError, match=r"task 'first': 1 eval item\(s\) .* \(training item 0 of task 'second'\)"):
        load_stream(str(path))
    files["a/test.jsonl"] = _qa(("Q: two?", " 2"), ("Q: six?", " 6"))
    path = write_stream(tmp_path, textwrap.dedent(LEAK).replace("    eval_split: test\n  - name: second",
                                                                "    eval_split: test\n    leaked_eval: drop\n"
                                                                "  - name: second"), files)
    first = load_stream(str(path)).tasks[0]
    assert [e.prompt for e in first.eval] == ["Q: six?"] and first.meta["counts"]["eval"]["leaked_dropped"] == 1


# ---------------------------------------------------------------------------------------------
# Templates


def test_template_fields_filters_and_errors() -> None:
    doc = {"q": "Sum?", "a": "3 + 4 = 7\n#### 1,007", "opts": ["x", "y"], "c": {"t": ["p", "q"]}, "n": 2,
           "code": "import os\ndef f_1(x):\n    return x\n", "tests": ["assert f(1) == 1", "assert f(2) == 2"]}
    assert render("{q} {{literal}} {a|final_number}", doc) == "Sum? {literal} 1007"
    assert render("{opts|lettered}|{c.t.1}|{n|letter}|{code|def_name}", doc) == "A. x\nB. y|q|C|f_1"
    assert render("def check(candidate):\n{tests|indented}", doc).endswith("\n    assert f(2) == 2")
    for template, message in [("{opts}", "is a list"), ("{missing}", "'missing' is missing"),
                              ("{q|shout}", "unknown filter 'shout'"), ("{q", "unclosed"), ("a}", "unmatched")]:
        with pytest.raises(TemplateError, match=message):
            render(template, doc)


# ---------------------------------------------------------------------------------------------
# Presets


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_validates_offline_and_says_where_it_comes_from(name: str) -> None:
    assert validate_stream_file(PRESET_DIR / f"{name}.yaml") == []
    header = (PRESET_DIR / f"{name}.yaml").read_text().split("\nname:")[0]
    assert header.startswith("# ") and "Metric" in header and "Source" in header, name
    spec = read_stream_spec(name)
    assert spec.config.name == name


def test_the_presets_are_the_ones_the_field_uses() -> None:
    assert set(list_presets()) == {"multidomain-synthetic", "mmlu-packaged", "humaneval-packaged", "casmo-b7",
                                   "mmlu-hub", "dialogue-speakers", "ct0", "olora-standard4", "styles-synthetic",
                                   "retention-mmlu", "retention-synthetic", "mmlu-packaged-cloze", "humaneval-lm-eval",
                                   "real-domains"}
    olora = read_stream_spec("olora-standard4")
    assert [olora.order_names(k) for k in range(3)] == [["dbpedia", "amazon", "yahoo", "agnews"],
                                                         ["dbpedia", "amazon", "agnews", "yahoo"],
                                                         ["yahoo", "amazon", "agnews", "dbpedia"]]
    casmo = read_stream_spec("casmo-b7")
    assert [t.cfg.scorer for t in casmo.tasks] == ["numeric", "code_pass_at_1", "multiple_choice", "perplexity"]


@pytest.mark.parametrize("name", ["casmo-b7", "mmlu-hub", "olora-standard4"])
def test_hub_presets_load_local_copies_shaped_like_the_hub(name: str, tmp_path: Path) -> None:
    """The presets' fields, labels and formats, unchanged, on rows in each hub data set's own columns,
    read by the same hf source through load_dataset("json", data_files=...)."""
    doc = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    for task in doc["tasks"]:
        source = task["source"]
        folder = HUB_SHAPED / "__".join([source["path"].replace("/", "__"), *filter(None, [source.get("name")])])
        splits = [task.get("train_split"), task.get("eval_split"), (task.get("split") or {}).get("source_split")]
        source.pop("name", None)
        source.update(path="json", data_files={s: str(folder / f"{s}.jsonl") for s in splits if s})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    stream = load_stream(str(path))
    assert stream.task_names == [t["name"] for t in doc["tasks"]]
    for task in stream.tasks:
        assert task.train and task.eval, task.name
        for item in task.eval:
            if task.scorer == "multiple_choice":
                assert item.target == item.delimiter + item.choices[item.gold]
            if task.scorer == "code_pass_at_1":
                assert f"def {item.entry_point}" in item.prompt and "def check(candidate)" in item.tests
                scope: dict[str, Any] = {}  # our own fixture code: checks the MBPP format, not user code
                exec(item.prompt + item.target + "\n" + item.tests, scope)  # noqa: S102
                scope["check"](scope[item.entry_point])
    if name == "olora-standard4":
        assert [t.eval[0].target for t in stream.tasks] == [" WrittenWork", " neutral", " Computers & Internet",
                                                           " Sci/Tech"]
        assert load_stream(str(path), order=2).task_names == ["yahoo", "amazon", "agnews", "dbpedia"]
    if name == "casmo-b7":
        math, code, qa, writing = stream.tasks
        assert [e.target for e in math.eval] == ["45", "42"] and qa.eval[0].target == " water"
        assert writing.eval[0].prompt.startswith("[WP] ") and writing.eval[0].target.startswith(" On Sundays")


def test_ct0_preset_reads_one_jsonl_export_per_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = read_stream_spec("ct0")
    for rt in spec.tasks:
        folder = tmp_path / Path(rt.cfg.source.options.path).parent.name
        folder.mkdir()
        for split, n in (("train", 3), ("test", 2)):
            rows = [{"prompt": f"{rt.cfg.name} input {split} {i}\n", "target": f"output {i}"} for i in range(n)]
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setenv("CLKIT_CT0_DIR", str(tmp_path))
    stream = load_stream("ct0")
    assert len(stream.tasks) == 8 and all((len(t.train), len(t.eval)) == (3, 2) for t in stream.tasks)
    assert stream.task_names[0] == "simplification" and stream.task_names[-1] == "twitter_stylometry"


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (PRESET_DIR.parent / "experiments").glob("*.yaml")))
def test_each_experiment_names_a_valid_stream_and_parses_with_its_offline_stand_in(experiment: str) -> None:
    """A reproduction file (configs/experiments/) runs on the hub (or the user's) data on a cluster and on
    the stand-in stream here, unchanged: its own stream validates offline, and the run config it makes
    with the stand-in passes every check main.py makes before a run."""
    from training.cli import parse_configs

    path = PRESET_DIR.parent / "experiments" / f"{experiment}.yaml"
    doc = yaml.safe_load(path.read_text())
    assert validate_stream_file(PRESET_DIR.parent.parent / doc["data"]["stream"]) == []
    stand_in = re.search(r"--stream (configs/streams/[\w-]+\.yaml)", path.read_text())
    assert stand_in, "the header names the offline stand-in stream"
    configs = parse_configs(["--config", str(path), "--stream", stand_in.group(1)])
    assert configs and configs[0].method.name == doc["method"]["name"]


def test_user_files_as_users_write_them_bom_fifo_device_size(tmp_path: Path) -> None:
    import os

    from data.errors import read_user_text

    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbfprompt,target\nq,a\n")  # what Excel's "CSV UTF-8" writes
    assert read_user_text(bom) == "prompt,target\nq,a\n"
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"pipe.jsonl \(task 'qa'\): is a FIFO, not a regular file"):
        read_user_text(fifo, "(task 'qa')")  # returns at once: no writer is waited for
    with pytest.raises(DataError, match=r"/dev/zero: is a device or socket"):
        read_user_text("/dev/zero")
    big = tmp_path / "big.jsonl"
    big.write_bytes(b"x" * 100)
    with pytest.raises(DataError, match=r"big.jsonl: 100 bytes, over the 10 bytes"):
        read_user_text(big, max_bytes=10)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b"\xef\xbb\xbfok\xff")
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 text \(byte 5\)"):
        read_user_text(bad)


def test_mmlu_all_subjects_and_the_questions_whose_answers_repeat() -> None:
    from data.streams.sources.base import ReadContext
    from data.streams.sources.packaged import MmluOptions, MmluPackagedSource, mmlu_subjects

    source, ctx = MmluPackagedSource(), ReadContext(Path("."), 0, "t", "multiple_choice")
    every = source.read(MmluOptions(subject="all"), "test", ctx)
    distinct = source.read(MmluOptions(subject="all", distinct_answers=True), "test", ctx)
    assert len(every.docs) == sum(mmlu_subjects().values()) == 14042  # MMLU's test set, stray CSV headers dropped
    assert {d.fields["subject"] for d in every.docs} == set(mmlu_subjects())
    # nine questions repeat an answer text (two equal choices always tie in the cloze format)
    assert distinct.meta["num_repeated_answer_records_dropped"] == 9 and len(distinct.docs) == len(every.docs) - 9
    assert all(len({d.fields[f"answer_{x}"].strip() for x in "abcd"}) == 4 for d in distinct.docs)
    assert source.check(MmluOptions(subject="all"), "multiple_choice") == []
