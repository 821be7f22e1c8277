"""Benchmark files: the package's own JSON layout and the public CASM raw facts format.

Own layout: one file ``<dir>/benchmark.json`` (layout in docs/data.md), written with sorted keys,
indent 2, UTF-8 and a trailing newline, so the same content always gives byte-identical files.
``read_benchmark`` checks every field and recomputes the fingerprint, so an edited or truncated
file is refused instead of silently evaluated.

CASM raw: ``synthetic_facts_raw.json``, a JSON list of {"entity", "relation", "value_<period>"...,
"changed"} records. Records become Facts and go through the same builder as the generator.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from artifacts.atomic import atomic_write_bytes
from data.build import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PASSAGE_FIELDS,
    PROBE_FIELDS,
    build_benchmark,
    content_json,
    fingerprint,
)
from data.config import PERIOD_NAME_RE, DataConfig
from data.errors import DataError, read_user_text
from data.schema import PROBE_FAMILIES, PROBE_KINDS, Benchmark, Fact, Passage, Period, Probe
from data.templates import RELATIONS, normalise_relation

BENCHMARK_FILE = "benchmark.json"
CASM_RAW_FILE = "synthetic_facts_raw.json"
CASM_BENCHMARK_NAME = "casm_temporalwiki"
# Version 1 (probes with `paraphrase`) is still read; written files are FORMAT_VERSION.
READABLE_VERSIONS = (1, FORMAT_VERSION)


# ---------------------------------------------------------------------------------------------
# Own layout


def benchmark_to_json(bench: Benchmark) -> dict[str, Any]:
    doc = content_json(bench.name, bench.periods)
    # Recomputed rather than bench.fingerprint: a benchmark read from a version-1 file keeps that
    # file's fingerprint, which does not match its content written in the current version.
    doc.update(
        format=FORMAT_NAME,
        format_version=FORMAT_VERSION,
        fingerprint=fingerprint(bench.name, bench.periods),
        meta=bench.meta,
    )
    return doc


def write_benchmark(bench: Benchmark, directory: str | os.PathLike[str]) -> Path:
    """Write ``<directory>/benchmark.json`` atomically; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(benchmark_to_json(bench), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    path = directory / BENCHMARK_FILE
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def _load_json(path: Path) -> Any:
    text = read_user_text(path)  # UTF-8, a byte-order mark allowed; a regular file of bounded size
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _record(obj: Any, where: str, expected: tuple[str, ...]) -> dict[str, Any]:
    """obj must be a JSON object with exactly the expected keys."""
    if not isinstance(obj, dict):
        raise DataError(f"{where} must be a JSON object (got {_type_name(obj)})")
    missing = [k for k in expected if k not in obj]
    if missing:
        raise DataError(f"{where} is missing field {missing[0]!r}; expected fields {list(expected)}")
    extra = sorted(set(obj) - set(expected))
    if extra:
        raise DataError(f"{where} has unknown field {extra[0]!r}; expected fields {list(expected)}")
    return obj


def _string(obj: dict[str, Any], key: str, where: str, nullable: bool = False) -> None:
    value = obj[key]
    if value is None and nullable:
        return
    if not isinstance(value, str) or not value:
        kind = "a non-empty string or null" if nullable else "a non-empty string"
        raise DataError(f"{where}.{key} must be {kind} (got {value!r})")


def read_benchmark(directory: str | os.PathLike[str]) -> Benchmark:
    """Read ``<directory>/benchmark.json`` as written by write_benchmark; checks every field."""
    path = Path(directory) / BENCHMARK_FILE
    doc = _record(_load_json(path), str(path), ("fingerprint", "format", "format_version", "meta", "name", "periods"))
    version = doc["format_version"]
    if doc["format"] != FORMAT_NAME or version not in READABLE_VERSIONS or isinstance(version, bool):
        raise DataError(
            f"{path}: format must be {FORMAT_NAME!r} version "
            f"{' or '.join(map(str, READABLE_VERSIONS))} "
            f"(got {doc['format']!r} version {doc['format_version']!r})"
        )
    _string(doc, "name", str(path))
    if not isinstance(doc["meta"], dict):
        raise DataError(f"{path}: meta must be a JSON object (got {_type_name(doc['meta'])})")
    if not isinstance(doc["periods"], list) or not doc["periods"]:
        raise DataError(f"{path}: periods must be a non-empty list")

    periods: list[Period] = []
    seen_ids: set[str] = set()
    for i, raw_period in enumerate(doc["periods"]):
        where = f"{path}: periods[{i}]"
        rec = _record(raw_period, where, ("index", "name", "passages", "probes"))
        if rec["index"] != i + 1 or isinstance(rec["index"], bool):
            raise DataError(f"{where}.index must be {i + 1} (got {rec['index']!r})")
        _string(rec, "name", where)
        name = rec["name"]
        if not PERIOD_NAME_RE.match(name) or name in [p.name for p in periods]:
            raise DataError(f"{where}.name must be a unique name matching [A-Za-z0-9][A-Za-z0-9_.-]* (got {name!r})")
        for key in ("passages", "probes"):
            if not isinstance(rec[key], list):
                raise DataError(f"{where}.{key} must be a list (got {_type_name(rec[key])})")
        passages = [_passage(p, f"{where}.passages[{j}]", name) for j, p in enumerate(rec["passages"])]
        probes = [_probe(p, f"{where}.probes[{j}]", name, version) for j, p in enumerate(rec["probes"])]
        for j, probe in enumerate(probes):
            if probe.id in seen_ids:
                raise DataError(f"{where}.probes[{j}].id {probe.id!r} is not unique")
            seen_ids.add(probe.id)
        periods.append(Period(index=i + 1, name=name, passages=tuple(passages), probes=tuple(probes)))

    names = [p.name for p in periods]
    for probe in (p for period in periods for p in period.probes):
        for key in ("valid_from", "valid_until"):
            value = getattr(probe, key)
            if value is not None and value not in names:
                raise DataError(
                    f"{path}: probe {probe.id}: {key} must be one of the period names {names} (got {value!r})"
                )

    # Over the records as stored, so a version-1 file (paraphrase instead of family) checks too.
    computed = _raw_fingerprint(doc["name"], doc["periods"])
    if computed != doc["fingerprint"]:
        raise DataError(
            f"{path}: fingerprint mismatch (stored {str(doc['fingerprint'])[:12]}, "
            f"content {computed[:12]}); the file was edited or damaged, regenerate it"
        )
    return Benchmark(name=doc["name"], periods=tuple(periods), fingerprint=computed, meta=doc["meta"])


def _passage(obj: Any, where: str, period: str) -> Passage:
    rec = _record(obj, where, PASSAGE_FIELDS)
    for key in PASSAGE_FIELDS:
        _string(rec, key, where)
    if rec["period"] != period:
        raise DataError(f"{where}.period must be {period!r}, the period it is listed in (got {rec['period']!r})")
    return Passage(**rec)


def _raw_fingerprint(name: str, raw_periods: list[Any]) -> str:
    """fingerprint() of the stored records themselves (equal to it for a current-version file)."""
    canonical = json.dumps(
        {"name": name, "periods": raw_periods}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# Version 1 probes had `paraphrase` (a never-trained wording) where version 2 has `family`.
_V1_PROBE_FIELDS = tuple("paraphrase" if f == "family" else f for f in PROBE_FIELDS)


def _probe(obj: Any, where: str, period: str, version: int = FORMAT_VERSION) -> Probe:
    rec = _record(obj, where, _V1_PROBE_FIELDS if version == 1 else PROBE_FIELDS)
    for key in ("id", "subject", "relation", "value", "period", "valid_from", "prompt", "template_id"):
        _string(rec, key, where)
    _string(rec, "valid_until", where, nullable=True)
    _string(rec, "previous_value", where, nullable=True)
    if rec["kind"] not in PROBE_KINDS:
        raise DataError(f"{where}.kind must be one of {', '.join(PROBE_KINDS)} (got {rec['kind']!r})")
    if version == 1:
        if not isinstance(rec["paraphrase"], bool):
            raise DataError(f"{where}.paraphrase must be true or false (got {rec['paraphrase']!r})")
        # A version-1 paraphrase probe used a wording no passage used: an extraction probe. Its
        # standard probe was a training wording of the relation not used for this fact in this
        # period, which is neither family exactly; it is read as storage (docs/data.md).
        rec = dict(rec)
        rec["family"] = "extraction" if rec.pop("paraphrase") else "storage"
    elif rec["family"] not in PROBE_FAMILIES:
        raise DataError(f"{where}.family must be one of {', '.join(PROBE_FAMILIES)} (got {rec['family']!r})")
    if rec["period"] != period:
        raise DataError(f"{where}.period must be {period!r}, the period it is listed in (got {rec['period']!r})")
    return Probe(**rec)


# ---------------------------------------------------------------------------------------------
# CASM raw facts


_VALUE_KEY_RE = re.compile(r"^value_(.+)$")


def read_casm_raw(path: str | os.PathLike[str], cfg: DataConfig) -> Benchmark:
    """Build a Benchmark from a CASM ``synthetic_facts_raw.json`` records file.

    Periods come from the ``value_<period>`` keys of the first record (numeric names sorted, other
    names in file order); every record must have the same set. ``changed`` must be a bool; it is
    redundant ("the value differs in at least one period", the public generator's definition), so one
    that contradicts the values is a warning naming the records (bench.meta["warnings"]) and the values
    decide, as in the built-files reader: the CASM project's own file has two such records. Relations
    are normalised (case, spaces, underscores, hyphens) and keep the same template family whatever
    their spelling. cfg.periods, cfg.num_facts and cfg.change_share do not apply: the file defines
    facts and changes.
    Fails on the first bad record; never drops one.
    """
    errors = cfg.validate()
    if errors:
        raise DataError(errors)
    path = Path(path)
    records = _load_json(path)
    if not isinstance(records, list):
        raise DataError(f"{path}: must be a JSON list of fact records (got {_type_name(records)})")
    if not records:
        raise DataError(f"{path}: contains no fact records")
    first = records[0]
    if not isinstance(first, dict):
        raise DataError(f"{path}: record 0 must be a JSON object (got {_type_name(first)})")
    value_keys = [k for k in first if _VALUE_KEY_RE.match(k)]
    if len(value_keys) < 2:
        raise DataError(f"{path}: record 0 must have at least two value_<period> fields (got {sorted(first)})")
    if all(k[len("value_") :].isdigit() for k in value_keys):
        value_keys.sort(key=lambda k: int(k[len("value_") :]))
    periods = [k[len("value_") :] for k in value_keys]
    for period in periods:
        if not PERIOD_NAME_RE.match(period):
            raise DataError(
                f"{path}: period name {period!r} (from value_{period}) must match [A-Za-z0-9][A-Za-z0-9_.-]*"
            )

    required = ("entity", "relation", *value_keys, "changed")
    facts: list[Fact] = []
    seen: dict[tuple[str, str], int] = {}
    contradicted: list[str] = []  # records whose changed flag disagrees with their values
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where} must be a JSON object (got {_type_name(rec)})")
        for key in required:
            if key not in rec:
                raise DataError(f"{where} is missing field {key!r}; every record needs {list(required)}")
        extra_values = sorted(k for k in rec if _VALUE_KEY_RE.match(k) and k not in value_keys)
        if extra_values:
            raise DataError(
                f"{where} has {extra_values[0]!r}, a period record 0 lacks; all records "
                f"must have the same value_<period> fields {value_keys}"
            )
        fields_: dict[str, str] = {}
        for key in ("entity", "relation", *value_keys):
            value = rec[key]
            # Integers (a population written as 4821) are unambiguous as text; floats and other
            # types are not, so they are refused rather than guessed.
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where} field {key!r} must be a non-empty string (got {value!r})")
            fields_[key] = value.strip()
        relation = normalise_relation(fields_["relation"])
        if not relation:
            raise DataError(f"{where} field 'relation' has no letters (got {rec['relation']!r})")
        key_pair = (fields_["entity"], relation)
        if key_pair in seen:
            raise DataError(
                f"{where} duplicates (entity, relation) {key_pair!r} of record "
                f"{seen[key_pair]} (relations compare after normalising case, spaces "
                "and underscores)"
            )
        seen[key_pair] = i
        values = {p: fields_[f"value_{p}"] for p in periods}
        changes = len(set(values.values())) > 1
        if not isinstance(rec["changed"], bool):
            raise DataError(f"{where} field 'changed' must be true or false (got {rec['changed']!r})")
        if rec["changed"] != changes:
            contradicted.append(
                f"{i} ({fields_['entity']}, {relation}: changed={str(rec['changed']).lower()}, "
                f"values {'differ' if changes else 'all equal'})"
            )
        facts.append(Fact(subject=fields_["entity"], relation=relation, values=values))

    if len(facts) != len(records):  # the loop raises on every bad record; this guards refactors
        raise DataError(f"{path}: built {len(facts)} facts from {len(records)} records")
    raw_bytes = path.read_bytes()
    warnings = []
    if contradicted:
        shown = "; ".join(contradicted[:10]) + (
            f"; and {len(contradicted) - 10} more" if len(contradicted) > 10 else ""
        )
        warnings.append(
            f"{path.name}: {len(contradicted)} record(s) have a 'changed' flag that contradicts their "
            f"values (the values are used): record {shown}"
        )
    meta = {
        "source": "casm_raw",
        "warnings": warnings,
        "source_file": path.name,
        "source_sha256": hashlib.sha256(raw_bytes).hexdigest(),
        "config": {
            k: v
            for k, v in asdict(cfg).items()
            if k
            in (
                "seed",
                "num_training_templates",
                "num_heldout_templates",
                "passages_per_fact",
                "qa_share",
                "unchanged_probes_per_period",
                "extraction_share",
            )
        },
        "records": len(records),
        "changed_facts": sum(1 for f in facts if len(set(f.values.values())) > 1),
        "relations": sorted({f.relation for f in facts}),
        "generic_template_relations": sorted({f.relation for f in facts if f.relation not in RELATIONS}),
        "facts": [asdict(f) for f in facts],
    }
    return build_benchmark(facts, periods, cfg, CASM_BENCHMARK_NAME, meta)
