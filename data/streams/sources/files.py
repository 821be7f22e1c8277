"""Sources that read local files: the user's JSONL and CSV, TRACE's JSON lists, dialogue CSVs.

Every path option may contain ``{split}`` (replaced by the split name: ``data/{split}.jsonl``) and
``${VAR}`` (read from the environment, for presets whose data the user provides); relative paths are
relative to the stream file. A path without ``{split}`` is one file with one split, called ``all``,
which a task divides with ``split: {eval_fraction: ...}``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from data.errors import DataError, read_user_text
from data.fields import Items, Range, Text
from data.streams.kinds import STANDARD_FIELDS
from data.streams.rules import Choice, Mapping, Pattern
from data.streams.sources.base import (
    FIELD_NAME_RE,
    FIELD_TYPES,
    Doc,
    ReadContext,
    RecordProblems,
    Source,
    SourceRead,
    apply_labels,
    check_fields,
    jsonl_lines,
    type_name,
)

SINGLE_SPLIT = "all"  # the split name of a path without {split}

FIELDS_RULE = Mapping(Pattern(FIELD_NAME_RE, "a field name"), Choice(FIELD_TYPES), 0, 200)
LABELS_RULE = Mapping(Pattern(FIELD_NAME_RE, "a field name"), Items(2, 100_000, Text(empty_ok=False)), 0, 50)


def _read_text(path: Path, task: str) -> str:
    """The task's file: UTF-8 with or without a byte-order mark, a regular file, bounded (data/errors.py)."""
    return read_user_text(path, f"(task {task!r})")


def _file_meta(path: Path, text: str) -> dict[str, Any]:
    return {"file": str(path), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def _split_path(raw: str, split: str, ctx: ReadContext, option: str = "path") -> Path:
    if "{split}" not in raw and split != SINGLE_SPLIT:
        # Config validation refuses this; kept as an invariant for direct callers.
        raise DataError(
            f"task {ctx.task!r}: source.{option} {raw!r} has no {{split}}, so its only split is "
            f"{SINGLE_SPLIT!r} (got {split!r})"
        )
    return ctx.path(raw.replace("{split}", split), option)


@dataclass
class TableOptions:
    """Options shared by the user-file sources and hf: which fields each record has, label names."""

    # the fields every record must have, name -> type (str, int, float, bool, list[str], list[int]);
    # a dotted name checks a nested mapping (choices.text); {} = the standard schema of the scorer's kind
    fields: Annotated[dict[str, str], FIELDS_RULE] = field(default_factory=dict)
    # integer class ids -> class names, per field ({label: [World, Sports, Business, Sci/Tech]})
    labels: Annotated[dict[str, list[str]], LABELS_RULE] = field(default_factory=dict)


def table_fields(opts: TableOptions, kind: str) -> dict[str, str]:
    """The declared fields as templates see them: label fields hold names (str) once mapped."""
    declared = dict(opts.fields or STANDARD_FIELDS[kind])
    for name in opts.labels:
        if name in declared:
            declared[name] = "str"
    return declared


def table_check(opts: TableOptions, kind: str) -> list[str]:
    declared = opts.fields or STANDARD_FIELDS[kind]
    problems = []
    for name in opts.labels:
        if declared.get(name) != "int":
            problems.append(
                f"labels.{name}: labels map integer class ids, but {name!r} is not declared as an int "
                f"field (fields: {', '.join(f'{k}: {v}' for k, v in declared.items())})"
            )
    return problems


def _record_fields(
    obj: dict[str, Any], declared: dict[str, str], labels: dict[str, list[str]], where: str, problems: RecordProblems
) -> dict[str, Any] | None:
    found = check_fields(obj, declared, where)
    if not found:
        found = apply_labels(obj, labels, where)
    for msg in found:
        problems.add(msg)
    return None if found else obj


# ---------------------------------------------------------------------------------------------


@dataclass
class JsonlOptions(TableOptions):
    REQUIRED: ClassVar[tuple[str, ...]] = ("path",)

    # the JSONL file (one JSON object per line); {split} -> the split name; ${VAR} from the environment
    path: Annotated[str, Text(empty_ok=False)] = ""


class JsonlSource(Source):
    name = "jsonl"
    options_cls = JsonlOptions
    summary = "your JSONL file(s): one JSON object per line with the declared fields"

    def splits(self, opts: JsonlOptions) -> tuple[str, ...] | None:
        return None if "{split}" in opts.path else (SINGLE_SPLIT,)

    def default_split(self, opts: JsonlOptions) -> str:
        return "train" if "{split}" in opts.path else SINGLE_SPLIT

    def fields(self, opts: JsonlOptions, kind: str) -> dict[str, str]:
        return table_fields(opts, kind)

    def check(self, opts: JsonlOptions, kind: str) -> list[str]:
        return table_check(opts, kind)

    def read(self, opts: JsonlOptions, split: str, ctx: ReadContext) -> SourceRead:
        path = _split_path(opts.path, split, ctx)
        text = _read_text(path, ctx.task)
        declared = opts.fields or STANDARD_FIELDS[ctx.kind]
        problems = RecordProblems(str(path))
        docs: list[Doc] = []
        lines = list(jsonl_lines(text, path))
        for line in lines:
            if line.problem is not None:
                problems.add(line.problem)
                continue
            if not isinstance(line.value, dict):
                problems.add(f"{line.where}: a record must be a JSON object (got {type_name(line.value)})")
                continue
            fields_ = _record_fields(line.value, declared, opts.labels, line.where, problems)
            if fields_ is not None:
                docs.append(Doc(id=f"{path.name}:{line.lineno}", where=line.where, fields=fields_))
        problems.raise_if_any()
        # the newline that ends the last line does not start another
        num_blank = text.count("\n") + (0 if text.endswith("\n") or not text else 1) - len(lines)
        return SourceRead(docs, {**_file_meta(path, text), "num_records": len(docs), "num_blank_lines": num_blank})


# ---------------------------------------------------------------------------------------------


@dataclass
class CsvOptions(TableOptions):
    REQUIRED: ClassVar[tuple[str, ...]] = ("path",)

    # the CSV file with a header row; {split} -> the split name; ${VAR} from the environment
    path: Annotated[str, Text(empty_ok=False)] = ""
    delimiter: Annotated[str, Pattern(re.compile(r"^[,;\t|]$"), "one delimiter character")] = ","


def _parse_cell(value: str, tp: str) -> Any:
    """A CSV cell as the declared type; raises ValueError when it is not one."""
    if tp == "str":
        return value
    if tp == "int":
        return int(value.strip())
    if tp == "float":
        return float(value.strip())
    if tp == "bool":
        low = value.strip().lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(value)
    raise AssertionError(tp)  # list types are refused by CsvSource.check


def _read_csv(path: Path, text: str, delimiter: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(start line, cells)]); a quoted cell may span lines, so lines are tracked per record."""
    reader = csv.reader(text.splitlines(keepends=True), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: empty file; expected a header row") from None
    except csv.Error as exc:
        raise DataError(f"{path}:1: malformed CSV header ({exc})") from None
    rows = []
    last = reader.line_num
    try:
        for cells in reader:
            rows.append((last + 1, cells))
            last = reader.line_num
    except csv.Error as exc:
        raise DataError(f"{path}:{last + 1}: malformed CSV ({exc})") from None
    return [h.strip() for h in header], rows


def _need_columns(path: Path, header: list[str], needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataError(
            f"{path}:1: missing column(s) {', '.join(missing)} ({what}); the header has: "
            f"{', '.join(repr(h) for h in header)}"
        )


class CsvSource(Source):
    name = "csv"
    options_cls = CsvOptions
    summary = "your CSV file(s) with a header row naming the declared fields"

    def splits(self, opts: CsvOptions) -> tuple[str, ...] | None:
        return None if "{split}" in opts.path else (SINGLE_SPLIT,)

    def default_split(self, opts: CsvOptions) -> str:
        return "train" if "{split}" in opts.path else SINGLE_SPLIT

    def fields(self, opts: CsvOptions, kind: str) -> dict[str, str]:
        return table_fields(opts, kind)

    def check(self, opts: CsvOptions, kind: str) -> list[str]:
        problems = table_check(opts, kind)
        declared = opts.fields or STANDARD_FIELDS[kind]
        for name, tp in declared.items():
            if tp.startswith("list[") or "." in name:
                problems.append(
                    f"fields.{name}: a CSV cell holds one value, so {tp} fields and nested names "
                    "are not possible; use separate columns (and format.choice_templates for "
                    "multiple-choice options)"
                )
        return problems

    def read(self, opts: CsvOptions, split: str, ctx: ReadContext) -> SourceRead:
        path = _split_path(opts.path, split, ctx)
        text = _read_text(path, ctx.task)
        declared = opts.fields or STANDARD_FIELDS[ctx.kind]
        header, rows = _read_csv(path, text, opts.delimiter)
        _need_columns(
            path,
            header,
            list(declared),
            "declared in fields:" if opts.fields else "the standard schema of the scorer's kind",
        )
        problems = RecordProblems(str(path))
        docs = []
        for lineno, cells in rows:
            where = f"{path}:{lineno}"
            if not any(c.strip() for c in cells):
                continue  # a blank line at the end of a hand-edited file
            if len(cells) != len(header):
                problems.add(f"{where}: {len(cells)} values for {len(header)} columns")
                continue
            row = dict(zip(header, cells))
            fields_: dict[str, Any] = {}
            for name, tp in declared.items():
                try:
                    fields_[name] = _parse_cell(row[name], tp)
                except ValueError:
                    problems.add(f"{where}: field {name!r} must be {tp} (got {row[name]!r})")
            if len(fields_) == len(declared):
                for msg in apply_labels(fields_, opts.labels, where):
                    problems.add(msg)
                docs.append(Doc(id=f"{path.name}:{lineno}", where=where, fields=fields_))
        problems.raise_if_any()
        return SourceRead(docs, {**_file_meta(path, text), "num_records": len(docs)})


# ---------------------------------------------------------------------------------------------


@dataclass
class TraceOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("path",)

    # a TRACE task file (a JSON list of {"prompt", "answer"}); TRACE ships train.json, eval.json and
    # test.json per task, so usually <task dir>/{split}.json
    path: Annotated[str, Text(empty_ok=False)] = ""


def _json_list_with_lines(path: Path, text: str) -> list[tuple[int, Any]]:
    """The elements of a top-level JSON list, each with the line it starts on (for messages)."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line(i: int) -> int:
        return text.count("\n", 0, i) + 1

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise DataError(f'{path}:{line(i)}: must be a JSON list of {{"prompt", "answer"}} objects (TRACE layout)')
    out: list[tuple[int, Any]] = []
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return out
    while True:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON at column {exc.colno}: {exc.msg}") from None
        out.append((line(i), obj))
        i = skip(end)
        if i < len(text) and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            break
        raise DataError(f"{path}:{line(i)}: malformed JSON: expected ',' or ']' after list element {len(out) - 1}")
    if skip(i + 1) != len(text):
        raise DataError(f"{path}:{line(skip(i + 1))}: malformed JSON: text after the closing ']'")
    return out


class TraceSource(Source):
    name = "trace"
    options_cls = TraceOptions
    summary = "TRACE benchmark task files: a JSON list of {prompt, answer} objects, read as is"
    FIELDS: ClassVar[dict[str, str]] = {"prompt": "str", "answer": "str"}

    def splits(self, opts: TraceOptions) -> tuple[str, ...] | None:
        return None if "{split}" in opts.path else (SINGLE_SPLIT,)

    def default_split(self, opts: TraceOptions) -> str:
        return "train" if "{split}" in opts.path else SINGLE_SPLIT

    def fields(self, opts: TraceOptions, kind: str) -> dict[str, str]:
        return dict(self.FIELDS)

    def default_format(self, opts: TraceOptions, kind: str) -> dict[str, Any]:
        # TRACE's prompts already end where the answer starts; its loader concatenates them as is.
        return {"prompt": "{prompt}", "target": "{answer}"}

    def read(self, opts: TraceOptions, split: str, ctx: ReadContext) -> SourceRead:
        path = _split_path(opts.path, split, ctx)
        text = _read_text(path, ctx.task)
        problems = RecordProblems(str(path))
        docs = []
        for i, (lineno, obj) in enumerate(_json_list_with_lines(path, text)):
            where = f"{path}:{lineno} (element {i})"
            if not isinstance(obj, dict):
                problems.add(f"{where}: must be a JSON object with prompt and answer (got {type_name(obj)})")
                continue
            found = check_fields(obj, self.FIELDS, where)
            for msg in found:
                problems.add(msg)
            if not found:
                docs.append(Doc(id=f"{path.name}#{i}", where=where, fields=obj))
        problems.raise_if_any()
        return SourceRead(docs, {**_file_meta(path, text), "num_records": len(docs)})


# ---------------------------------------------------------------------------------------------


@dataclass
class DialogueOptions:
    REQUIRED: ClassVar[tuple[str, ...]] = ("path",)

    # the transcript CSV (header ",speaker,text": pandas' unnamed index column, then speaker and text);
    # {split} -> the split name; ${VAR} from the environment
    path: Annotated[str, Text(empty_ok=False)] = ""
    speaker: Annotated[str, Text()] = ""  # whose utterances this task holds, by name ...
    # ... or by rank: 1 = the speaker with the most utterances (ties by name); 0 = use `speaker`
    speaker_rank: Annotated[int, Range(0, 10_000)] = 0


class DialogueCsvSource(Source):
    name = "dialogue_csv"
    options_cls = DialogueOptions
    summary = "a transcript CSV (,speaker,text): one speaker's utterances per task, for perplexity"
    COLUMNS: ClassVar[tuple[str, ...]] = ("speaker", "text")

    def splits(self, opts: DialogueOptions) -> tuple[str, ...] | None:
        return None if "{split}" in opts.path else (SINGLE_SPLIT,)

    def default_split(self, opts: DialogueOptions) -> str:
        return "train" if "{split}" in opts.path else SINGLE_SPLIT

    def fields(self, opts: DialogueOptions, kind: str) -> dict[str, str]:
        return {"speaker": "str", "text": "str"}

    def default_format(self, opts: DialogueOptions, kind: str) -> dict[str, Any]:
        return {"prompt": "", "target": "{text}"}

    def check(self, opts: DialogueOptions, kind: str) -> list[str]:
        if bool(opts.speaker.strip()) == bool(opts.speaker_rank):
            return [
                (
                    "speaker: give exactly one of speaker (a name) and speaker_rank (1 = most utterances) "
                    f"(got speaker {opts.speaker!r}, speaker_rank {opts.speaker_rank})"
                )
            ]
        return []

    def read(self, opts: DialogueOptions, split: str, ctx: ReadContext) -> SourceRead:
        path = _split_path(opts.path, split, ctx)
        text = _read_text(path, ctx.task)
        header, rows = _read_csv(path, text, ",")
        _need_columns(path, header, list(self.COLUMNS), "the dialogue layout is ',speaker,text'")
        s_col, t_col = header.index("speaker"), header.index("text")
        problems = RecordProblems(str(path))
        utterances: list[tuple[int, str, str]] = []
        num_empty = 0
        for lineno, cells in rows:
            if not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                problems.add(f"{path}:{lineno}: {len(cells)} values for {len(header)} columns")
                continue
            speaker, utterance = cells[s_col].strip(), cells[t_col].strip()
            if not utterance:
                num_empty += 1  # a turn with no words (a stage direction column left empty) has no text to score
                continue
            if not speaker:
                problems.add(f"{path}:{lineno}: field 'speaker' is empty")
                continue
            utterances.append((lineno, speaker, utterance))
        problems.raise_if_any()
        counts = Counter(s for _, s, _ in utterances)
        ranked = sorted(counts, key=lambda s: (-counts[s], s))
        listing = ", ".join(f"{s} ({counts[s]})" for s in ranked[:20]) + (" ..." if len(ranked) > 20 else "")
        if opts.speaker_rank:
            if opts.speaker_rank > len(ranked):
                raise DataError(
                    f"{path}: task {ctx.task!r}: source.speaker_rank {opts.speaker_rank}, but the file has "
                    f"{len(ranked)} speakers: {listing}"
                )
            speaker = ranked[opts.speaker_rank - 1]
        else:
            speaker = opts.speaker.strip()
            if speaker not in counts:
                raise DataError(
                    f"{path}: task {ctx.task!r}: source.speaker {speaker!r} has no utterances; speakers "
                    f"by number of utterances: {listing or '(none)'}"
                )
        docs = [
            Doc(id=f"{path.name}:{lineno}", where=f"{path}:{lineno}", fields={"speaker": s, "text": u})
            for lineno, s, u in utterances
            if s == speaker
        ]
        return SourceRead(
            docs,
            {
                **_file_meta(path, text),
                "speaker": speaker,
                "num_rows": len(rows),
                "num_speakers": len(ranked),
                "num_utterances": len(docs),
                "num_empty_dropped": num_empty,
            },
        )
