"""Task streams: any sequence of tasks with real task metrics, defined in one YAML file.

Public API (file format and every source in docs/streams.md):

- ``load_stream(path, order=0, seed=0)``: read a stream file (or a preset name from
  configs/streams/), load every task's data, split, cap and check it; returns a ``Stream``
  (data/streams/schema.py). ``order`` picks one of the file's ``orders:``; ``seed`` is the data seed
  (generated items, seeded splits and caps), independent of the training seed.
- ``validate_stream_file(path)``: every problem of a stream file found without reading any data (hub
  presets validate offline); [] when it is valid.
- ``SOURCES``: the registry of source types (data/streams/sources/__init__.py).
- ``PRESET_DIR`` / ``list_presets()`` / ``resolve_stream_path(spec)``: the shipped presets.

Every bad input raises ``DataError`` (data/errors.py) holding one message per problem
(``exc.problems``), each naming the file, the line and the field.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from data.errors import DataError
from data.streams.build import build_stream
from data.streams.config import FormatConfig, SplitConfig, StreamConfig, StreamSpec, TaskConfig, read_stream_file
from data.streams.kinds import SCORER_KINDS
from data.streams.schema import EvalItem, Stream, TaskData, TrainItem
from data.streams.sources import SOURCES

__all__ = [
    "PRESET_DIR",
    "SCORER_KINDS",
    "SOURCES",
    "DataError",
    "EvalItem",
    "FormatConfig",
    "SplitConfig",
    "Stream",
    "StreamConfig",
    "StreamSpec",
    "TaskConfig",
    "TaskData",
    "TrainItem",
    "list_presets",
    "load_stream",
    "read_stream_spec",
    "resolve_stream_path",
    "validate_stream_file",
]

PRESET_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "streams"


def list_presets() -> list[str]:
    """Names of the stream files shipped in configs/streams/ (without .yaml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_stream_path(spec: str | os.PathLike[str]) -> Path:
    """A stream file path, or a preset name ("mmlu-packaged") -> configs/streams/<name>.yaml."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{spec}.yaml"
    if "/" not in str(spec) and preset.is_file():
        return preset
    raise DataError(f"stream {str(spec)!r}: no such file and not a preset; presets: {', '.join(list_presets())}")


def read_stream_spec(path: str | os.PathLike[str], scorers: Collection[str] | None = None) -> StreamSpec:
    """The checked stream file, without reading data; DataError with every problem otherwise."""
    spec, problems = read_stream_file(resolve_stream_path(path), scorers)
    if problems:
        raise DataError(problems)
    assert spec is not None
    return spec


def validate_stream_file(path: str | os.PathLike[str], scorers: Collection[str] | None = None) -> list[str]:
    """Every problem of a stream file (config, field mapping, scorer, splits, orders); reads no data.

    `scorers` is the scorer registry's names when the caller has it (the CLI); by default the names
    in data/streams/kinds.py.
    """
    try:
        resolved = resolve_stream_path(path)
    except DataError as exc:
        return [str(exc)]
    return read_stream_file(resolved, scorers)[1]


def load_stream(
    path: str | os.PathLike[str], order: int = 0, seed: int = 0, scorers: Collection[str] | None = None
) -> Stream:
    """Load a stream file (or preset name): every task read, split, capped and checked for leakage."""
    return build_stream(read_stream_spec(path, scorers), order, seed)
