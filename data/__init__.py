"""Benchmarks of facts that change over periods: Synthetic TemporalWiki, CASM raw facts and CASM's built files.

Public API (contracts in docs/design.md, formats in docs/data.md):

- ``DataConfig``: the ``data`` section of the run config.
- ``load_benchmark(spec, cfg)``: generate or read a benchmark, then check train/test disjointness.
- ``check_no_leakage(bench)``: no probe's prompt + answer occurs verbatim in a training passage.
- ``DataError``: every bad-input error, with a one-line message naming the file/field.
"""

from __future__ import annotations

from pathlib import Path

from data.build import check_no_leakage
from data.casm_built import CASM_BUILT_SOURCE, PASSAGES_FILE, PROBES_FILE, is_casm_built_dir, read_casm_built
from data.config import DataConfig
from data.errors import DataError
from data.io import BENCHMARK_FILE, CASM_RAW_FILE, read_benchmark, read_casm_raw, write_benchmark
from data.schema import Benchmark
from data.temporalwiki import generate

__all__ = [
    "DataConfig",
    "DataError",
    "check_no_leakage",
    "generate",
    "load_benchmark",
    "read_benchmark",
    "read_casm_built",
    "read_casm_raw",
    "write_benchmark",
]

GENERATED_BENCHMARK = "temporalwiki"

_ACCEPTED = (
    f"'{GENERATED_BENCHMARK}' (generate), a directory holding {BENCHMARK_FILE} "
    f"(from write_benchmark), a directory holding CASM's {PASSAGES_FILE} and {PROBES_FILE}, "
    f"or a {CASM_RAW_FILE} file or a directory holding one"
)

# Sources whose probes are "storage" probes, worded like the training passages on purpose: a verbatim
# overlap is what they test, so their reader reports it as a warning and check_no_leakage is not run.
STORAGE_PROBE_SOURCES = (CASM_BUILT_SOURCE,)


def load_benchmark(spec: str, cfg: DataConfig) -> Benchmark:
    """The benchmark named by ``spec`` (usually cfg.benchmark), checked for probe leakage.

    spec: "temporalwiki" -> generate(cfg); a directory with benchmark.json -> read_benchmark;
    a directory with passages.json and probes.json (CASM's built files; they win over a
    synthetic_facts_raw.json next to them) -> read_casm_built; a directory with
    synthetic_facts_raw.json, or any other .json file -> read_casm_raw (benchmark.json itself ->
    read_benchmark of its directory; passages.json or probes.json -> read_casm_built of its
    directory). Anything else -> DataError. Warnings of a reader are in bench.meta["warnings"].
    """
    errors = cfg.validate()
    if errors:
        raise DataError(errors)
    if spec == GENERATED_BENCHMARK:
        bench = generate(cfg)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if (path / BENCHMARK_FILE).is_file():
                bench = read_benchmark(path)
            elif is_casm_built_dir(path):
                bench = read_casm_built(path, cfg)
            elif (path / CASM_RAW_FILE).is_file():
                bench = read_casm_raw(path / CASM_RAW_FILE, cfg)
            else:
                raise DataError(
                    f"benchmark {spec!r}: directory holds none of {BENCHMARK_FILE}, "
                    f"{PASSAGES_FILE} + {PROBES_FILE}, {CASM_RAW_FILE}; expected {_ACCEPTED}"
                )
        elif path.is_file() and path.name == BENCHMARK_FILE:
            bench = read_benchmark(path.parent)
        elif path.is_file() and path.name in (PASSAGES_FILE, PROBES_FILE):
            bench = read_casm_built(path.parent, cfg)
        elif path.is_file() and path.suffix == ".json":
            bench = read_casm_raw(path, cfg)
        elif path.exists():
            raise DataError(f"benchmark {spec!r}: not a .json file or a directory; expected {_ACCEPTED}")
        else:
            raise DataError(f"benchmark {spec!r}: no such file or directory; expected {_ACCEPTED}")
    if bench.meta.get("source") not in STORAGE_PROBE_SOURCES:
        check_no_leakage(bench)
    return bench
