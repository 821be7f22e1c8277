"""Hugging Face datasets: ``datasets.load_dataset(path, name, split=..., data_files=...)``.

One code path for the hub and for local data: ``path`` is a hub id (``openai/gsm8k``), a packaged
builder with ``data_files`` (``json``, ``csv``, ``parquet``), or a local dataset directory (written
``./dir`` or ``/abs/dir``; datasets infers the splits from file names such as train.jsonl). The
tests run the same call on local files shaped like the hub's, since a hub download is not possible
everywhere (offline clusters: point HF_DATASETS_OFFLINE=1 at a warm cache).

Every row is checked against the declared ``fields`` (so a renamed column fails loudly instead of
becoming an empty prompt), and ``labels`` turns class ids into names; when the dataset's own
ClassLabel names are known they must equal the declared ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from data.errors import DataError
from data.fields import Text
from data.streams.kinds import STANDARD_FIELDS
from data.streams.rules import Mapping, Pattern
from data.streams.sources.base import Doc, ReadContext, RecordProblems, Source, SourceRead, apply_labels, check_fields
from data.streams.sources.files import TableOptions, table_check, table_fields

_SPLIT_NAME = Pattern(re.compile(r"^[A-Za-z0-9_]+$"), "a split name")
_LOCAL_PREFIXES = (".", "/", "~", "${")


@dataclass
class HfOptions(TableOptions):
    REQUIRED: ClassVar[tuple[str, ...]] = ("path",)

    # a hub id (openai/gsm8k), a builder for data_files (json, csv, parquet), or a local dataset
    # directory written ./dir or /abs/dir (relative to the stream file)
    path: Annotated[str, Text(empty_ok=False)] = ""
    name: Annotated[str, Text()] = ""  # the dataset configuration (gsm8k: main; mmlu: abstract_algebra); "" = none
    revision: Annotated[str, Text()] = ""  # a hub commit or tag to pin; "" = the default branch
    # split name -> file or glob, for builders such as json (relative to the stream file); {} = none
    data_files: Annotated[dict[str, str], Mapping(_SPLIT_NAME, Text(empty_ok=False), 0, 20)] = field(
        default_factory=dict
    )


def _is_local(path: str) -> bool:
    return path.startswith(_LOCAL_PREFIXES)


class HfSource(Source):
    name = "hf"
    options_cls = HfOptions
    summary = "datasets.load_dataset(path, name, split, data_files): the hub, a builder on files, a local dir"

    def splits(self, opts: HfOptions) -> tuple[str, ...] | None:
        return tuple(opts.data_files) if opts.data_files else None

    def default_split(self, opts: HfOptions) -> str:
        return next(iter(opts.data_files)) if opts.data_files else "train"

    def fields(self, opts: HfOptions, kind: str) -> dict[str, str]:
        return table_fields(opts, kind)

    def check(self, opts: HfOptions, kind: str) -> list[str]:
        return table_check(opts, kind)

    def read(self, opts: HfOptions, split: str, ctx: ReadContext) -> SourceRead:
        import datasets  # imported here: a second or more of start-up that only hf tasks need

        path = str(ctx.path(opts.path, "path")) if _is_local(opts.path) else opts.path
        kwargs: dict[str, Any] = {"split": split}
        if opts.name:
            kwargs["name"] = opts.name
        if opts.revision:
            kwargs["revision"] = opts.revision
        if opts.data_files:
            kwargs["data_files"] = {k: str(ctx.path(v, f"data_files.{k}")) for k, v in opts.data_files.items()}
        # Messages name the file for a builder on local files, else the data set (and configuration).
        where_ds = (
            kwargs["data_files"][split]
            if split in kwargs.get("data_files", {})
            else opts.path + (f" ({opts.name})" if opts.name else "")
        )
        try:
            ds = datasets.load_dataset(path, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the library raises many types; each becomes one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(
                f"task {ctx.task!r}: hf source {where_ds} split {split!r}: cannot load "
                f"({type(exc).__name__}: {first}); offline, use a local copy (./dir or data_files) "
                "or a warm cache with HF_DATASETS_OFFLINE=1"
            ) from None
        declared = opts.fields or STANDARD_FIELDS[ctx.kind]
        columns = set(ds.column_names)
        missing = sorted({name.split(".")[0] for name in declared} - columns)
        if missing:
            raise DataError(
                f"{where_ds}[{split}]: missing column(s) {', '.join(missing)} (declared in fields:); "
                f"the dataset has: {', '.join(sorted(columns))}"
            )
        for name, names in opts.labels.items():
            feature = ds.features.get(name)
            known = getattr(feature, "names", None)
            if known is not None and list(known) != list(names):
                raise DataError(
                    f"{where_ds}[{split}]: labels.{name} {names} differ from the dataset's class names "
                    f"{list(known)}; copy them in that order"
                )
        problems = RecordProblems(f"{where_ds}[{split}]")
        docs = []
        for i, row in enumerate(ds):
            where = f"{where_ds}[{split}] row {i}"
            found = check_fields(row, declared, where) or apply_labels(row, opts.labels, where)
            for msg in found:
                problems.add(msg)
            if not found:
                docs.append(Doc(id=f"row{i}", where=where, fields=row))
        problems.raise_if_any()
        fingerprint = getattr(ds, "_fingerprint", "")
        return SourceRead(
            docs,
            {
                "path": opts.path,
                "name": opts.name,
                "revision": opts.revision,
                "split": split,
                "num_rows": len(ds),
                "datasets_fingerprint": fingerprint,
            },
        )
