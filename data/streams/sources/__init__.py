"""The SOURCES registry: every kind of data a stream task can read, by its `source.type` key.

Written out in one dict (no registration by import side effects), so the list of sources is this
file; tests/test_streams.py checks that each key matches its class's name and that the docs list
every one.
"""

from __future__ import annotations

from data.streams.sources.base import Doc, ReadContext, Source, SourceRead
from data.streams.sources.files import CsvSource, DialogueCsvSource, JsonlSource, TraceSource
from data.streams.sources.generated import GeneratedSource
from data.streams.sources.hf import HfSource
from data.streams.sources.lm_eval import LmEvalSource
from data.streams.sources.packaged import HumanEvalPackagedSource, MmluPackagedSource

SOURCES: dict[str, Source] = {
    "jsonl": JsonlSource(),
    "csv": CsvSource(),
    "trace": TraceSource(),
    "dialogue_csv": DialogueCsvSource(),
    "hf": HfSource(),
    "mmlu_packaged": MmluPackagedSource(),
    "humaneval_packaged": HumanEvalPackagedSource(),
    "generated": GeneratedSource(),
    "lm_eval": LmEvalSource(),
}

__all__ = ["SOURCES", "Doc", "ReadContext", "Source", "SourceRead"]
