"""The stream file: a YAML list of tasks, each a source, a scorer, splits and a prompt format.

    name: multidomain-synthetic
    tasks:
      - name: math
        source: {type: generated, domain: math, num_train: 48, num_eval: 16}
        scorer: numeric
        train_split: train
        eval_split: test
        format: {prompt: "Question: {question}\\nAnswer:", target: " {answer|final_number}"}
    orders: [[math, code], [code, math]]   # optional alternative orders

Every section is a dataclass whose fields declare their valid values (data/fields.py and
data/streams/rules.py), checked by one generic builder that collects every problem; each problem is
reported as ``<file>:<line>: <dotted.field> <what is wrong and what is valid>``. Cross-field rules
(splits, format vs scorer, templates vs the source's declared fields, orders) follow, still without
reading any data, so ``validate_stream_file`` can check a hub preset offline.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml

from data.fields import Items, Name, Range, Text, build_dataclass
from data.streams.kinds import KINDS, SCORER_KINDS, STANDARD_FORMATS, kind_of
from data.streams.rules import Pattern, Seq, problems_of, show
from data.streams.sources import SOURCES
from data.streams.sources.base import FIELD_NAME_RE, Source
from data.streams.templates import template_problems

MAX_TASKS = 100
MAX_ITEMS = 10_000_000


@dataclass
class FormatConfig:
    """How a document becomes a prompt, a target, choices and training text (lm-eval's doc_to_*)."""

    prompt: Annotated[str, Text()] = ""  # doc_to_text: the template of the prompt
    target: Annotated[str, Text()] = ""  # doc_to_target: the template of the gold continuation
    # the template of the training continuation; "" = the target (GSM8K: the full solution here,
    # only the final number as the target)
    completion: Annotated[str, Text()] = ""
    # doc_to_choice as a field: the document field holding the list of choice texts
    choices: Annotated[str, Pattern(FIELD_NAME_RE, "a document field name", empty_ok=True)] = ""
    # doc_to_choice as a list: one template per choice (["A", "B", "C", "D"] or ["{option1}", "{option2}"])
    choice_templates: Annotated[list[str], Items(0, 26, Text(empty_ok=False))] = field(default_factory=list)
    # put before every choice to form its continuation (lm-eval's target_delimiter)
    choice_prefix: Annotated[str, Text()] = " "
    # the document field of the gold choice: an index, a letter A.. or the choice's text
    gold: Annotated[str, Pattern(FIELD_NAME_RE, "a document field name", empty_ok=True)] = ""
    tests: Annotated[str, Text()] = ""  # code tasks: the template of the test program
    entry_point: Annotated[str, Text()] = ""  # code tasks: the template of the tested function's name


@dataclass
class SplitConfig:
    """A seeded, disjoint train/eval split of one source split (for sources with no usable train split)."""

    eval_fraction: Annotated[float, Range(0, 1, lo_open=True, hi_open=True)] = 0.2  # share of items held out
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0  # mixed with the stream seed; pins one split
    source_split: Annotated[str, Text()] = ""  # which split of the source to divide; "" = the source's default


@dataclass
class SourceConfig:
    """`source:` of a task: the registry key and that source's own options dataclass."""

    type: Annotated[str, Name()] = ""  # a key of SOURCES
    options: Any = None


@dataclass
class TaskConfig:
    REQUIRED: ClassVar[tuple[str, ...]] = ("name", "source", "scorer")

    name: Annotated[str, Name()] = ""  # unique within the stream; becomes a path component
    source: SourceConfig = field(default_factory=SourceConfig)
    scorer: Annotated[str, Name()] = ""  # a scorer of eval_and_metrics/scorers (see data/streams/kinds.py)
    train_split: Annotated[str, Text()] = ""  # the source's split to train on; "" with eval_split = eval only
    eval_split: Annotated[str, Text()] = ""  # the source's split to evaluate on
    split: SplitConfig | None = None  # instead of train_split/eval_split: a seeded split of one source split
    format: FormatConfig = field(default_factory=FormatConfig)
    loss_on: Literal["completion", "all"] = "completion"  # training loss on the completion only, or on all tokens
    max_train: Annotated[int, Range(0, MAX_ITEMS)] = 0  # cap on training items (seeded sample); 0 = no cap
    max_eval: Annotated[int, Range(0, MAX_ITEMS)] = 0  # cap on eval items (seeded sample); 0 = no cap
    # an eval item also found in training data: refuse the stream, or drop the item and count it
    leaked_eval: Literal["error", "drop"] = "error"


@dataclass
class StreamConfig:
    REQUIRED: ClassVar[tuple[str, ...]] = ("name",)  # tasks: checked where the tasks are built

    name: Annotated[str, Name()] = ""
    tasks: Annotated[list[TaskConfig], Seq(1, MAX_TASKS, what="task sections")] = field(default_factory=list)
    # alternative orders, each every task name exactly once; load_stream(order=k) picks orders[k]
    orders: Annotated[list[list[str]], Seq(0, 100, Items(1, MAX_TASKS, Name()), what="orders")] = field(
        default_factory=list
    )


@dataclass(frozen=True)
class ResolvedTask:
    """A task config with its source object, kind and format merged from the defaults."""

    cfg: TaskConfig
    source: Source
    kind: str
    fmt: FormatConfig
    declared: dict[str, str]  # the document fields the source declares with these options


@dataclass(frozen=True)
class StreamSpec:
    """A checked stream file: what load_stream builds from."""

    path: Path
    config: StreamConfig
    tasks: tuple[ResolvedTask, ...]
    lines: dict[str, int]  # dotted field -> line in the file, for messages raised while loading

    def order_names(self, order: int) -> list[str]:
        if self.config.orders:
            return list(self.config.orders[order])
        return [t.cfg.name for t in self.tasks]

    def num_orders(self) -> int:
        return len(self.config.orders) or 1

    def where(self, dotted: str) -> str:
        """'<file>:<line>' of a dotted field (or of its nearest enclosing one)."""
        line = _line_of(dotted, self.lines)
        return f"{self.path}:{line}" if line else str(self.path)


# ---------------------------------------------------------------------------------------------
# Reading the YAML with line numbers


def _line_map(node: yaml.Node, prefix: str, out: dict[str, int], repeated: list[str]) -> None:
    """Dotted field -> line of every key and list entry; `repeated` gets keys given twice in a mapping
    (PyYAML silently keeps the last one, which would hide half of a user's edit)."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            dotted = f"{prefix}.{key.value}" if prefix else str(key.value)
            if dotted in out:
                repeated.append(
                    f"{dotted} is given twice (lines {out[dotted]} and {key.start_mark.line + 1}); "
                    "YAML would keep only the last"
                )
            out[dotted] = key.start_mark.line + 1
            _line_map(value, dotted, out, repeated)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            dotted = f"{prefix}[{i}]"
            out[dotted] = item.start_mark.line + 1
            _line_map(item, dotted, out, repeated)


def _line_of(dotted: str, lines: dict[str, int]) -> int | None:
    """The line of a field, or of the nearest enclosing field that has one."""
    while dotted:
        if dotted in lines:
            return lines[dotted]
        cut = max(dotted.rfind("."), dotted.rfind("["))
        dotted = dotted[:cut] if cut > 0 else ""
    return None


def _locate(problem: str, path: Path, lines: dict[str, int]) -> str:
    """Prefix a problem (which starts with its dotted field, or `unknown key <field>;`) with '<file>:<line>: '."""
    dotted = problem.removeprefix("unknown key ").split(" ", 1)[0].rstrip(";")
    line = _line_of(dotted, lines)
    return f"{path}:{line}: {problem}" if line else f"{path}: {problem}"


class _FileProblem(Exception):
    """A stream file that cannot be read or parsed at all: one message, nothing else to check."""


def _read_yaml(path: Path) -> tuple[Any, dict[str, int], list[str]]:
    """(the parsed document, dotted field -> line, repeated keys); _FileProblem on unreadable YAML."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _FileProblem(f"{path}: no such stream file") from None
    except UnicodeDecodeError as exc:
        raise _FileProblem(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise _FileProblem(f"{path}: cannot read ({exc.strerror})") from None
    try:
        doc = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise _FileProblem(f"{path}{where}: malformed YAML: {getattr(exc, 'problem', None) or exc}") from None
    lines: dict[str, int] = {}
    repeated: list[str] = []
    if node is not None:
        _line_map(node, "", lines, repeated)
    return doc, lines, repeated


# ---------------------------------------------------------------------------------------------
# Generic building: dataclass <- mapping, every problem collected


def build_section(cls: type, data: Any, path: str, problems: list[str], skip: Collection[str] = ()) -> Any:
    """Instantiate dataclass `cls` from a mapping (data/fields.py's builder), appending every problem;
    the declared rules include the stream's own (data/streams/rules.py)."""
    return build_dataclass(cls, data, path, problems, skip=skip, check=partial(problems_of, skip=skip))


# ---------------------------------------------------------------------------------------------
# Sources, formats and the cross-field rules


def _build_source(raw: Any, path: str, problems: list[str]) -> tuple[SourceConfig, Source | None]:
    if not isinstance(raw, dict):
        problems.append(f"{path} must be a mapping with 'type' and that source's options (got {show(raw)})")
        return SourceConfig(), None
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in SOURCES:
        problems.append(f"{path}.type {show(kind)} is not a source; valid: {', '.join(SOURCES)}")
        return SourceConfig(), None
    source = SOURCES[kind]
    opts = build_section(source.options_cls, {k: v for k, v in raw.items() if k != "type"}, path, problems)
    return SourceConfig(type=kind, options=opts), source


def _merged_format(raw_fmt: Any, kind: str, source: Source, opts: Any) -> dict[str, Any]:
    """Standard format of the kind < the source's defaults < the task's own keys."""
    merged: dict[str, Any] = dict(STANDARD_FORMATS[kind])
    for layer in (source.default_format(opts, kind), raw_fmt if isinstance(raw_fmt, dict) else {}):
        # choices and choice_templates are two spellings of one thing: a layer setting either
        # replaces both of the layers below
        if "choices" in layer or "choice_templates" in layer:
            merged.pop("choices", None)
            merged.pop("choice_templates", None)
        merged.update(layer)
    return merged


def format_problems(fmt: FormatConfig, kind: str, declared: dict[str, str], path: str) -> list[str]:
    """The format against the scorer's kind and the source's declared fields (offline)."""
    problems = []
    templates = {
        "prompt": fmt.prompt,
        "target": fmt.target,
        "completion": fmt.completion,
        "tests": fmt.tests,
        "entry_point": fmt.entry_point,
    }
    templates.update({f"choice_templates[{i}]": t for i, t in enumerate(fmt.choice_templates)})
    for key, template in templates.items():
        for msg in template_problems(template, declared):
            problems.append(f"{path}.{key} {msg}")

    def need(*keys: str) -> None:
        for key in keys:
            if not getattr(fmt, key).strip():
                problems.append(f"{path}.{key} is required for a {kind} scorer")

    def forbid(*keys: str) -> None:
        for key in keys:
            if getattr(fmt, key):
                owner = "code" if key in ("tests", "entry_point") else "multiple_choice"
                problems.append(f"{path}.{key} applies to {owner} scorers only, not to a {kind} scorer; remove it")

    if kind in ("generate", "numeric"):
        need("prompt", "target")
        forbid("choices", "choice_templates", "gold", "tests", "entry_point")
    elif kind == "code":
        need("prompt", "target", "tests", "entry_point")
        forbid("choices", "choice_templates", "gold")
    elif kind == "perplexity":
        need("target")
        forbid("choices", "choice_templates", "gold", "tests", "entry_point")
    elif kind == "multiple_choice":
        need("prompt", "gold")
        forbid("tests", "entry_point")
        if fmt.target:
            problems.append(f"{path}.target must be empty for a multiple_choice scorer: the target is the gold choice")
        if bool(fmt.choices) == bool(fmt.choice_templates):
            problems.append(
                f"{path} needs exactly one of choices (a field holding the list of choices) and "
                "choice_templates (one template per choice)"
            )
        if fmt.choices and declared.get(fmt.choices) != "list[str]":
            problems.append(
                f"{path}.choices {fmt.choices!r} must name a list[str] field of this source; its "
                f"fields: {_fields_text(declared)}"
            )
        if fmt.gold and declared.get(fmt.gold) not in ("int", "str"):
            problems.append(
                f"{path}.gold {fmt.gold!r} must name an int or str field of this source (an index, "
                f"a letter or the choice text); its fields: {_fields_text(declared)}"
            )
    return problems


def _fields_text(declared: dict[str, str]) -> str:
    return ", ".join(f"{k} ({v})" for k, v in sorted(declared.items())) or "(none)"


def _split_problems(task: TaskConfig, source: Source, path: str) -> list[str]:
    problems = []
    if task.split is not None and (task.train_split or task.eval_split):
        problems.append(f"{path}.split replaces train_split/eval_split; give one or the other")
    if task.split is None and not task.eval_split:
        problems.append(
            f"{path}.eval_split is required (with train_split), or split: {{eval_fraction: 0.2}} "
            "for a seeded disjoint split of one source split"
        )
    if task.train_split and task.train_split == task.eval_split:
        # ../shared/LESSONS.md: a benchmark whose test rows were part of its training rows.
        problems.append(
            f"{path}.eval_split {task.eval_split!r} is also the train_split: training and evaluating "
            "on one split measures memorisation; use another split or split: {eval_fraction: ...}"
        )
    available = source.splits(task.source.options)
    if available is not None:
        named = {"train_split": task.train_split, "eval_split": task.eval_split}
        if task.split is not None:
            named["split.source_split"] = task.split.source_split
        for key, value in named.items():
            if value and value not in available:
                hint = (
                    "; use split: {eval_fraction: 0.2} for a seeded disjoint train/eval split"
                    if len(available) == 1
                    else ""
                )
                problems.append(
                    f"{path}.{key} {value!r}: source {source.name} has only the split(s) {', '.join(available)}{hint}"
                )
    return problems


def _order_problems(cfg: StreamConfig) -> list[str]:
    names = [t.name for t in cfg.tasks]
    problems = []
    for i, order in enumerate(cfg.orders):
        missing = [n for n in names if n not in order]
        unknown = [n for n in order if n not in names]
        repeated = sorted({n for n in order if order.count(n) > 1})
        if missing or unknown or repeated:
            parts = [
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown {', '.join(unknown)}" if unknown else "",
                f"repeated {', '.join(repeated)}" if repeated else "",
            ]
            problems.append(
                f"orders[{i}] must list every task exactly once ({'; '.join(p for p in parts if p)}); "
                f"tasks: {', '.join(names)}"
            )
    return problems


def parse_stream(
    doc: dict[str, Any], scorers: Collection[str] | None = None
) -> tuple[StreamConfig, list[ResolvedTask], list[str]]:
    """Build and check a stream config from a parsed YAML document; (config, tasks, problems)."""
    problems: list[str] = []
    # Tasks are built one by one below (each source has its own options dataclass), not generically.
    cfg = build_section(StreamConfig, doc, "", problems, skip=("tasks",))
    raw_tasks = doc.get("tasks")
    tasks_rule = Seq(1, MAX_TASKS, what="task sections")
    if "tasks" not in doc:
        problems.append(f"tasks is required: {tasks_rule.describe()}")
        raw_tasks = []
    elif tasks_rule.problem(raw_tasks):
        problems.append(f"tasks must be {tasks_rule.describe()} (got {show(raw_tasks)})")
        raw_tasks = []
    valid_scorers = list(scorers) if scorers is not None else list(SCORER_KINDS)
    resolved: list[ResolvedTask] = []
    tasks: list[TaskConfig] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_tasks or []):
        path = f"tasks[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{path} must be a mapping with name, source, scorer, splits and format (got {show(raw)})")
            continue
        num_before = len(problems)
        task = build_section(TaskConfig, raw, path, problems, skip=("source", "format"))
        task.source, source = _build_source(raw.get("source"), f"{path}.source", problems)
        if task.name in seen:
            problems.append(
                f"{path}.name {task.name!r} repeats the name of tasks[{seen[task.name]}]; task names must be unique"
            )
        elif task.name:
            seen[task.name] = i
        if task.scorer and task.scorer not in valid_scorers:
            problems.append(f"{path}.scorer {task.scorer!r} is not a scorer; valid: {', '.join(valid_scorers)}")
        tasks.append(task)
        if source is None or len(problems) > num_before:
            continue
        opts = task.source.options
        raw_fmt = raw.get("format")
        if raw_fmt is not None and not isinstance(raw_fmt, dict):
            problems.append(f"{path}.format must be a mapping of prompt, target, ... templates (got {show(raw_fmt)})")
            continue
        kind = kind_of(task.scorer, raw_fmt if isinstance(raw_fmt, dict) else {})
        assert kind in KINDS
        problems.extend(f"{path}.source.{msg}" for msg in source.check(opts, kind))
        fmt = build_section(FormatConfig, _merged_format(raw_fmt, kind, source, opts), f"{path}.format", problems)
        declared = source.fields(opts, kind)
        problems.extend(format_problems(fmt, kind, declared, f"{path}.format"))
        problems.extend(_split_problems(task, source, path))
        task.format = fmt
        resolved.append(ResolvedTask(cfg=task, source=source, kind=kind, fmt=fmt, declared=declared))
    cfg.tasks = tasks
    if not problems:
        problems.extend(_order_problems(cfg))
    return cfg, resolved, problems


def read_stream_file(path: str | Path, scorers: Collection[str] | None = None) -> tuple[StreamSpec | None, list[str]]:
    """Read and check a stream file without reading any data; (spec or None, located problems)."""
    path = Path(path)
    try:
        doc, lines, repeated = _read_yaml(path)
    except _FileProblem as exc:
        return None, [str(exc)]
    if not isinstance(doc, dict):
        return None, [f"{path}: the top level must be a mapping with name, tasks and optionally orders"]
    cfg, tasks, problems = parse_stream(doc, scorers)
    problems = repeated + problems
    if problems:
        return None, [_locate(p, path, lines) for p in problems]
    return StreamSpec(path=path, config=cfg, tasks=tuple(tasks), lines=lines), []
