"""From a checked stream file to a Stream: read, render, split, deduplicate, cap, check leakage.

For each task:

1. read the source's split(s): train_split and eval_split, or the one split that `split:` divides;
2. render every document through the task's format into a TrainItem and an EvalItem, checking each
   item against the scorer's needs (a numeric target is a number, choices are distinct, a code item
   has tests and an entry point); a document that cannot be rendered is an error naming its line;
3. `split:` divides the items by a seeded hash of their prompt (of the text, for perplexity), so
   items that share a prompt always fall on the same side and the split does not depend on the
   order of the file;
4. drop exact duplicate items within each side (counted);
5. cap each side at max_train / max_eval by a seeded hash of the item id, never by file position
   (hub training splits are often sorted by label: the first N rows would be one class), and keep
   the kept items in source order;
6. refuse an eval item whose prompt + target, or whose prompt, is also a training item of any task of
   the stream (whitespace-normalised), unless the task says leaked_eval: drop.

Every count (read, used, dropped and why) goes into TaskData.meta, so a run record says what the
numbers were computed on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

from data.errors import DataError
from data.numbers import number_problem
from data.streams.config import FormatConfig, ResolvedTask, StreamSpec
from data.streams.schema import EvalItem, Stream, TaskData, TrainItem
from data.streams.sources.base import Doc, ReadContext, RecordProblems, SourceRead
from data.streams.templates import LETTERS, TemplateError, lookup, render

_WS = re.compile(r"\s+")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def norm(text: str) -> str:
    """Whitespace-normalised text: the form in which train and eval items are compared."""
    return _WS.sub(" ", text).strip()


def _rank(*parts: object) -> str:
    """A stable pseudo-random sort key, independent of PYTHONHASHSEED and of the order of the input."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Rendering one document


def _gold_index(value: Any, raw_choices: list[str]) -> int:
    """An index (0-based), a choice's exact text, or a letter A.. (in that order of precedence)."""
    if isinstance(value, bool):
        raise TemplateError(f"gold must be an index, a letter or a choice text (got {value!r})")
    if isinstance(value, int):
        if not 0 <= value < len(raw_choices):
            raise TemplateError(f"gold index {value} is out of range for {len(raw_choices)} choices")
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in raw_choices:
            return raw_choices.index(text)
        if len(text) == 1 and text.upper() in LETTERS[: len(raw_choices)]:
            return LETTERS.index(text.upper())
        raise TemplateError(f"gold {value!r} is neither a choice's text nor a letter A-{LETTERS[len(raw_choices) - 1]}")
    raise TemplateError(f"gold must be an index, a letter or a choice text (got {type(value).__name__})")


def render_doc(
    doc: Doc, rt: ResolvedTask, split: str, source_delimiter: str | None = None
) -> tuple[TrainItem, EvalItem]:
    """The training and eval item of one document; TemplateError says which format key failed.

    A multiple-choice item keeps its choices and the delimiter put before each (format.choice_prefix)
    apart, as lm-eval keeps doc_to_choice and target_delimiter: the delimiter is scored, the choice's
    own length normalises. A source that defines its own delimiter (an lm-eval task's target_delimiter,
    `source_delimiter`) gives the choices verbatim, as lm-eval scores them; others' are stripped.
    """
    fmt: FormatConfig = rt.fmt
    kind = rt.kind

    def field(key: str) -> str:
        try:
            return render(getattr(fmt, key), doc.fields)
        except TemplateError as exc:
            raise TemplateError(f"format.{key}: {exc}") from None

    prompt = field("prompt")
    choices: tuple[str, ...] = ()
    delimiter: str | None = None
    gold = -1
    tests = entry_point = ""
    if kind == "multiple_choice":
        try:
            if fmt.choices:
                raw = lookup(doc.fields, tuple(fmt.choices.split(".")))
                if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
                    raise TemplateError(f"field {fmt.choices!r} must be a list of strings")
                raw_choices = [c if source_delimiter is not None else c.strip() for c in raw]
            else:
                raw_choices = [render(t, doc.fields).strip() for t in fmt.choice_templates]
            gold = _gold_index(lookup(doc.fields, tuple(fmt.gold.split("."))), raw_choices)
        except TemplateError as exc:
            raise TemplateError(f"format.choices/gold: {exc}") from None
        if len(raw_choices) < 2 or not all(raw_choices) or len(set(raw_choices)) != len(raw_choices):
            raise TemplateError(f"format.choices: needs at least 2 distinct non-empty choices (got {raw_choices!r})")
        delimiter = fmt.choice_prefix if source_delimiter is None else source_delimiter
        choices = tuple(raw_choices)
        target = delimiter + choices[gold]
    else:
        target = field("target")
        if not target.strip():
            raise TemplateError("format.target renders an empty target")
        if kind == "numeric":
            # the grammar the numeric scorer reads the gold by (data/numbers.py), so the target is scored
            # as exactly the number accepted here
            problem = number_problem(target)
            if problem is not None:
                hint = "; for a worked solution use {answer|final_number}" if len(target.split()) > 1 else ""
                raise TemplateError(f"format.target must render a number for the numeric scorer: {problem}{hint}")
        if kind == "code":
            tests, entry_point = field("tests"), field("entry_point").strip()
            if not tests.strip():
                raise TemplateError("format.tests renders an empty test program")
            if not _IDENT.match(entry_point):
                raise TemplateError(f"format.entry_point must render a Python identifier (got {entry_point!r})")
    if kind != "perplexity" and not prompt.strip():
        raise TemplateError("format.prompt renders an empty prompt")
    completion = field("completion") if fmt.completion else target
    eval_target = target.strip() if kind == "numeric" else target
    item_id = f"{rt.cfg.name}/{split}/{doc.id}"
    return (
        TrainItem(prompt=prompt, completion=completion),
        EvalItem(
            id=item_id,
            prompt=prompt,
            target=eval_target,
            choices=choices,
            gold=gold,
            tests=tests,
            entry_point=entry_point,
            delimiter=delimiter,
        ),
    )


def _render_all(read: SourceRead, rt: ResolvedTask, split: str, what: str) -> list[tuple[TrainItem, EvalItem]]:
    problems = RecordProblems(what)
    out = []
    for doc in read.docs:
        try:
            out.append(render_doc(doc, rt, split, read.choice_delimiter))
        except TemplateError as exc:
            problems.add(f"{doc.where}: task {rt.cfg.name!r}: {exc}")
    problems.raise_if_any()
    return out


# ---------------------------------------------------------------------------------------------
# Splitting, deduplication, caps


def split_key(item: EvalItem, kind: str) -> str:
    """What decides an item's side in a seeded split: its prompt, or its text for perplexity."""
    if kind != "perplexity" and item.prompt.strip():
        return norm(item.prompt)
    return norm(item.prompt + item.target)


def seeded_split(
    pairs: list[tuple[TrainItem, EvalItem]], kind: str, eval_fraction: float, key_seed: str
) -> tuple[list[tuple[TrainItem, EvalItem]], list[tuple[TrainItem, EvalItem]]]:
    """(train pairs, eval pairs): a disjoint split by a seeded hash of each item's split key."""
    keys = sorted({split_key(e, kind) for _, e in pairs}, key=lambda k: _rank(key_seed, k))
    if len(keys) < 2:
        raise DataError(f"a seeded split needs at least 2 distinct items (got {len(keys)})")
    num_eval = min(max(1, round(eval_fraction * len(keys))), len(keys) - 1)
    eval_keys = set(keys[:num_eval])
    train = [p for p in pairs if split_key(p[1], kind) not in eval_keys]
    held = [p for p in pairs if split_key(p[1], kind) in eval_keys]
    return train, held


def _dedupe(items: list[Any], key: Any) -> tuple[list[Any], int]:
    seen: set[Any] = set()
    out = []
    for item in items:
        k = key(item)
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out, len(items) - len(out)


def _cap(items: list[Any], limit: int, ids: list[str], key_seed: str) -> list[Any]:
    """At most `limit` items, chosen by a seeded hash of their ids, in their original order."""
    if not limit or len(items) <= limit:
        return items
    keep = set(sorted(range(len(items)), key=lambda i: _rank(key_seed, ids[i]))[:limit])
    return [item for i, item in enumerate(items) if i in keep]


def _eval_identity(e: EvalItem) -> tuple[Any, ...]:
    return (e.prompt, e.target, e.choices, e.gold, e.tests, e.entry_point, e.delimiter)


# ---------------------------------------------------------------------------------------------
# One task


def build_task(rt: ResolvedTask, spec: StreamSpec, seed: int) -> TaskData:
    cfg = rt.cfg
    opts = cfg.source.options
    ctx = ReadContext(stream_file=spec.path, seed=seed, task=cfg.name, kind=rt.kind)
    where = spec.where(f"tasks[{[t.cfg.name for t in spec.tasks].index(cfg.name)}]")
    meta: dict[str, Any] = {
        "source": {"type": cfg.source.type, **asdict(opts)},
        "scorer": cfg.scorer,
        "kind": rt.kind,
        "format": asdict(rt.fmt),
        "stream_seed": seed,
        "read": {},
    }
    if cfg.split is not None:
        source_split = cfg.split.source_split or rt.source.default_split(opts)
        read = rt.source.read(opts, source_split, ctx)
        meta["read"][source_split] = read.meta
        pairs = _render_all(read, rt, source_split, f"task {cfg.name!r}")
        try:
            train_pairs, eval_pairs = seeded_split(
                pairs, rt.kind, cfg.split.eval_fraction, f"{seed}:{cfg.split.seed}:{cfg.name}:split"
            )
        except DataError as exc:
            raise DataError(f"{where}: task {cfg.name!r}: {exc}") from None
        meta["split"] = {
            "method": "seeded",
            "source_split": source_split,
            "eval_fraction": cfg.split.eval_fraction,
            "seed": cfg.split.seed,
            "stream_seed": seed,
            "by": "sha256 of the whitespace-normalised prompt (text for perplexity)",
        }
        num_read = {"train": len(read.docs), "eval": len(read.docs)}
    else:
        train_pairs = []
        num_read = {"train": 0, "eval": 0}
        if cfg.train_split:
            read = rt.source.read(opts, cfg.train_split, ctx)
            meta["read"][cfg.train_split] = read.meta
            train_pairs = _render_all(read, rt, cfg.train_split, f"task {cfg.name!r}")
            num_read["train"] = len(read.docs)
        read = rt.source.read(opts, cfg.eval_split, ctx)
        meta["read"][cfg.eval_split] = read.meta
        eval_pairs = _render_all(read, rt, cfg.eval_split, f"task {cfg.name!r}")
        num_read["eval"] = len(read.docs)
        meta["split"] = {"method": "source", "train_split": cfg.train_split, "eval_split": cfg.eval_split}
        if not cfg.train_split:
            meta["split"]["eval_only"] = True

    unique_train, train_dups = _dedupe(train_pairs, lambda p: (p[0].prompt, p[0].completion))
    train = [t for t, _ in unique_train]
    evals, eval_dups = _dedupe([e for _, e in eval_pairs], _eval_identity)
    num_train_unique, num_eval_unique = len(train), len(evals)
    # A training item's id is its document's eval id (TrainItem has none): stable across runs.
    train = _cap(train, cfg.max_train, [e.id for _, e in unique_train], f"{seed}:{cfg.name}:cap:train")
    evals = _cap(evals, cfg.max_eval, [e.id for e in evals], f"{seed}:{cfg.name}:cap:eval")
    if not evals:
        raise DataError(f"{where}: task {cfg.name!r} has no eval items (read {num_read['eval']} records)")
    if (cfg.train_split or cfg.split is not None) and not train:
        raise DataError(f"{where}: task {cfg.name!r} has no training items (read {num_read['train']} records)")
    if len({e.id for e in evals}) != len(evals):
        raise DataError(
            f"{where}: task {cfg.name!r}: eval item ids are not unique (the source gave two records one id)"
        )
    meta["counts"] = {
        "train": {
            "read": num_read["train"],
            "rendered": len(train_pairs),
            "duplicates_dropped": train_dups,
            "capped_from": num_train_unique,
            "used": len(train),
        },
        "eval": {
            "read": num_read["eval"],
            "rendered": len(eval_pairs),
            "duplicates_dropped": eval_dups,
            "capped_from": num_eval_unique,
            "used": len(evals),
        },
    }
    return TaskData(
        name=cfg.name, scorer=cfg.scorer, train=tuple(train), eval=tuple(evals), loss_on=cfg.loss_on, meta=meta
    )


# ---------------------------------------------------------------------------------------------
# Leakage across the stream


def _train_keys(item: TrainItem) -> list[str]:
    keys = [norm(item.prompt + item.completion)]
    if item.prompt.strip():
        keys.append("prompt:" + norm(item.prompt))
    return keys


def _eval_keys(item: EvalItem, kind: str) -> list[str]:
    keys = [norm(item.prompt + item.target)]
    # A perplexity item's prompt is context (a WritingPrompts prompt has many stories): only its text counts.
    if kind != "perplexity" and item.prompt.strip():
        keys.append("prompt:" + norm(item.prompt))
    return keys


def check_leakage(
    tasks: list[TaskData], kinds: dict[str, str], spec: StreamSpec, policies: Mapping[str, str]
) -> list[TaskData]:
    """Refuse (or, with leaked_eval: drop, remove and count) eval items that are training items.

    Training items of every task count, not only of the earlier ones: every task is evaluated after
    every period, so a later task's training set holding an earlier task's eval items would inflate
    that task's retention and hide forgetting.
    """
    index: dict[str, tuple[str, int]] = {}
    for task in tasks:
        for j, item in enumerate(task.train):
            for key in _train_keys(item):
                index.setdefault(key, (task.name, j))
    out = []
    names = [t.cfg.name for t in spec.tasks]
    for task in tasks:
        leaked: list[tuple[EvalItem, tuple[str, int]]] = []
        for eval_item in task.eval:
            hit = next((index[k] for k in _eval_keys(eval_item, kinds[task.name]) if k in index), None)
            if hit is not None:
                leaked.append((eval_item, hit))
        if leaked and policies[task.name] == "error":
            first, (other, j) = leaked[0]
            raise DataError(
                f"{spec.where(f'tasks[{names.index(task.name)}]')}: task {task.name!r}: {len(leaked)} eval "
                f"item(s) also occur in training data, first {first.id} (training item {j} of task "
                f"{other!r}); an eval item seen in training measures memorisation: fix the data or the "
                "splits, or set leaked_eval: drop to drop and count them"
            )
        if leaked:
            drop = {e.id for e, _ in leaked}
            kept = tuple(e for e in task.eval if e.id not in drop)
            if not kept:
                raise DataError(
                    f"{spec.where(f'tasks[{names.index(task.name)}]')}: task {task.name!r}: every eval "
                    "item also occurs in training data"
                )
            meta = dict(task.meta)
            meta["counts"] = {
                **meta["counts"],
                "eval": {**meta["counts"]["eval"], "leaked_dropped": len(leaked), "used": len(kept)},
            }
            task = replace(task, eval=kept, meta=meta)
        out.append(task)
    return out


# ---------------------------------------------------------------------------------------------


def build_stream(spec: StreamSpec, order: int, seed: int) -> Stream:
    if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order < spec.num_orders():
        listed = "the file has no orders:, so only 0" if not spec.config.orders else f"0..{spec.num_orders() - 1}"
        raise DataError(f"{spec.path}: order {order!r} does not exist; valid: {listed}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**31 - 1:
        raise DataError(f"stream seed must be an integer in [0, 2147483647] (got {seed!r})")
    built = [build_task(rt, spec, seed) for rt in spec.tasks]
    kinds = {rt.cfg.name: rt.kind for rt in spec.tasks}
    policies = {rt.cfg.name: rt.cfg.leaked_eval for rt in spec.tasks}
    by_name = {t.name: t for t in check_leakage(built, kinds, spec, policies)}
    return Stream(name=spec.config.name, tasks=tuple(by_name[n] for n in spec.order_names(order)), order=order)
