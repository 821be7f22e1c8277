"""The CASM project's built benchmark: ``passages.json`` + ``probes.json`` in one directory.

These are the files the CASM paper trained and evaluated on (its ``data/build_passages.py`` and
``data/build_probes.py`` write them from ``synthetic_facts_raw.json``), so reading them runs exactly
that benchmark instead of our rebuild of the raw facts (``io.read_casm_raw``). Layout and mapping:
docs/data.md, "The CASM project's built files".

- ``passages.json``: {period: [passage text, ...]}; the key order is the period order.
- ``probes.json``: {period: {"changed": [probe, ...], "unchanged": [probe, ...]}}, each probe the
  ``asdict`` of CASM's Probe: prompt, ground_truth, subject, relation, current_value, is_changed,
  timestamp, previous_value, valid_from, valid_until, source, metadata.

The values (ground_truth per fact and period) are the truth. Everything CASM derived from them
(is_changed, the changed/unchanged split, current_value, timestamp, metadata.period, previous_value,
valid_from, valid_until) is recomputed from the values; a file field that disagrees is a warning
naming the records, never a refusal. CASM leaves previous_value and valid_until null on purpose (its
ContradictionDetector fills them at run time), so a null there is "not given", not a disagreement.
Only what makes the data unusable (unreadable file, wrong structure, missing or mistyped field, a
period that is not in the files, an empty period, an ambiguous duplicate) is a DataError with one
line per problem.

Warnings are returned in ``Benchmark.meta["warnings"]`` (one line each); the CLI prints each as a
``warning:`` line and the run directory's benchmark.json keeps them.

CASM's probes are worded like its passages ("[2018] The X of Y is" for "In 2018, the X of Y is V."):
they test recall of the trained statement ("storage" probes), so a verbatim overlap between a probe
and a passage is reported as a warning here and ``load_benchmark`` does not apply its strict
``check_no_leakage`` to this source (see STORAGE_PROBE_SOURCES in data/__init__.py).
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data.build import count_summary, fingerprint, probe_id
from data.config import PERIOD_NAME_RE, DataConfig
from data.errors import DataError
from data.io import _load_json, _type_name
from data.schema import Benchmark, Passage, Period, Probe, ProbeKind
from data.templates import normalise_relation

PASSAGES_FILE = "passages.json"
PROBES_FILE = "probes.json"
CASM_BUILT_SOURCE = "casm_built"
CASM_BUILT_BENCHMARK_NAME = "casm_built"
SPLITS = ("changed", "unchanged")
# Passages are plain strings; when none of its period's probes has both its subject and its answer in
# the text, the passage keeps this placeholder metadata (nothing in training reads it).
UNKNOWN = "(unknown)"
MAX_ERRORS = 20  # a broken 3000-probe file should not print 3000 lines
MAX_IDS = 3  # ids named per warning line before "and N more"


def is_casm_built_dir(path: Path) -> bool:
    return (path / PASSAGES_FILE).is_file() and (path / PROBES_FILE).is_file()


@dataclass
class _Row:
    """One probe record of probes.json after its type checks."""

    loc: str  # "period '2020' changed[3]", for messages
    k: int  # 0-based period position
    split: str
    subject: str
    relation: str  # normalised
    value: str  # ground_truth
    prompt: str
    is_changed: bool | None
    previous_value: str | None
    valid_from: str | None
    valid_until: str | None
    current_value: str | None
    labels: dict[str, str]  # redundant period labels: timestamp, metadata.period, metadata.prev_period

    @property
    def key(self) -> tuple[str, str]:
        return (self.subject, self.relation)


def casm_probe(
    row: _Row, period: str, *, kind: ProbeKind, previous_value: str | None, valid_from: str, valid_until: str | None
) -> Probe:
    """Our Probe for one CASM probe record; the values derived from the data are passed in.

    CASM probes are worded like the training passages: they are "storage" probes (docs/data.md). CASM
    has no held-out wordings, so a CASM-built benchmark has no extraction probes.
    """
    return Probe(
        id=probe_id(period, row.subject, row.relation, "storage"),
        subject=row.subject,
        relation=row.relation,
        value=row.value,
        period=period,
        valid_from=valid_from,
        valid_until=valid_until,
        previous_value=previous_value,
        kind=kind,
        family="storage",
        prompt=row.prompt,
        template_id=f"casm/{row.split}",
    )


class _Warnings:
    """Disagreements grouped by what disagrees: one line per group naming a few probe ids, then a count."""

    def __init__(self) -> None:
        self.groups: dict[str, list[str]] = defaultdict(list)
        self.other: list[str] = []

    def add(self, what: str, probe: str) -> None:
        self.groups[what].append(probe)

    def lines(self) -> list[str]:
        out = list(self.other)
        for what, ids in self.groups.items():
            more = f" and {len(ids) - MAX_IDS} more" if len(ids) > MAX_IDS else ""
            out.append(f"{PROBES_FILE}: {len(ids)} probe(s) {what}: {', '.join(ids[:MAX_IDS])}{more}")
        return out


def _raise_if(errors: list[str]) -> None:
    if errors:
        extra = len(errors) - MAX_ERRORS
        raise DataError(errors[:MAX_ERRORS] + ([f"... and {extra} more problems"] if extra > 0 else []))


def _read_passages(path: Path) -> dict[str, list[str]]:
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path}: must be a JSON object {{period: [passage text, ...]}} (got {_type_name(doc)})")
    errors: list[str] = []
    if len(doc) < 2:
        errors.append(f"{path}: needs at least two periods (got {list(doc)})")
    passages: dict[str, list[str]] = {}
    for period, texts in doc.items():
        if not PERIOD_NAME_RE.match(period):
            errors.append(
                f"{path}: period name {period!r} must match [A-Za-z0-9][A-Za-z0-9_.-]* (it becomes a directory name)"
            )
        if not isinstance(texts, list):
            errors.append(f"{path}: period {period!r} must be a list of passage texts (got {_type_name(texts)})")
            continue
        if not texts:
            errors.append(f"{path}: period {period!r} has no passages")
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                errors.append(
                    f"{path}: period {period!r} passage [{i}] must be a non-empty string "
                    f"(got {_type_name(text)} {str(text)[:40]!r})"
                )
        passages[period] = texts
    _raise_if(errors)
    return passages


def _string(rec: dict[str, Any], key: str, where: str, errors: list[str], *, required: bool) -> str | None:
    """rec[key] as a stripped non-empty string; None when absent/null and not required."""
    if key not in rec or (rec[key] is None and not required):
        if required:
            errors.append(f"{where} is missing field {key!r}")
        return None
    value = rec[key]
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string" if required else "a non-empty string or null"
        errors.append(f"{where} field {key!r} must be {kind} (got {value!r})")
        return None
    return value.strip()


def _row(rec: Any, path: Path, loc: str, k: int, split: str, periods: list[str], errors: list[str]) -> _Row | None:
    where = f"{path}: {loc}"
    if not isinstance(rec, dict):
        errors.append(f"{where} must be a JSON object (got {_type_name(rec)})")
        return None
    before = len(errors)
    subject = _string(rec, "subject", where, errors, required=True)
    relation_raw = _string(rec, "relation", where, errors, required=True)
    value = _string(rec, "ground_truth", where, errors, required=True)
    prompt = _string(rec, "prompt", where, errors, required=True)
    relation = normalise_relation(relation_raw) if relation_raw else None
    if relation_raw and not relation:
        errors.append(f"{where} field 'relation' has no letters (got {relation_raw!r})")
    optional = {
        key: _string(rec, key, where, errors, required=False)
        for key in ("previous_value", "valid_from", "valid_until", "current_value", "timestamp")
    }
    for key in ("valid_from", "valid_until"):
        if optional[key] is not None and optional[key] not in periods:
            errors.append(
                f"{where} field {key!r} names period {optional[key]!r}, which is not in the files (periods: {periods})"
            )
    is_changed = rec.get("is_changed")
    if is_changed is not None and not isinstance(is_changed, bool):
        errors.append(f"{where} field 'is_changed' must be true, false or null (got {is_changed!r})")
    labels = {"timestamp": optional["timestamp"]} if optional["timestamp"] else {}
    metadata = rec.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        errors.append(f"{where} field 'metadata' must be a JSON object or null (got {_type_name(metadata)})")
    elif metadata:
        for key in ("period", "prev_period"):
            label = _string(metadata, key, f"{where} metadata", errors, required=False)
            if label:
                labels[f"metadata.{key}"] = label
    if len(errors) > before:
        return None
    assert subject and relation and value and prompt  # the checks above appended otherwise
    # Evaluation appends " " + value to the prompt, so a trailing space would be doubled.
    return _Row(
        loc=loc,
        k=k,
        split=split,
        subject=subject,
        relation=relation,
        value=value,
        prompt=prompt.rstrip(),
        is_changed=is_changed,
        previous_value=optional["previous_value"],
        valid_from=optional["valid_from"],
        valid_until=optional["valid_until"],
        current_value=optional["current_value"],
        labels=labels,
    )


def _read_probes(path: Path, periods: list[str], passages_path: Path, warnings: _Warnings) -> list[list[_Row]]:
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise DataError(
            f'{path}: must be a JSON object {{period: {{"changed": [...], '
            f'"unchanged": [...]}}}} (got {_type_name(doc)})'
        )
    errors = [
        f"{path}: period {p!r} is not in {passages_path.name} (periods: {periods})" for p in doc if p not in periods
    ]
    errors += [f"{path}: period {p!r} of {passages_path.name} has no entry" for p in periods if p not in doc]
    _raise_if(errors)
    if list(doc) != periods:
        warnings.other.append(
            f"{path.name}: periods listed in another order ({list(doc)}) than in "
            f"{passages_path.name} ({periods}); the order of {passages_path.name} "
            "is used"
        )

    rows: list[list[_Row]] = []
    for k, period in enumerate(periods):
        splits = doc[period]
        here: list[_Row] = []
        if not isinstance(splits, dict):
            errors.append(
                f"{path}: period {period!r} must be a JSON object with lists {list(SPLITS)} (got {_type_name(splits)})"
            )
            rows.append(here)
            continue
        for split, records in splits.items():
            if split not in SPLITS:
                errors.append(f"{path}: period {period!r} has unknown list {split!r}; expected {list(SPLITS)}")
                continue
            if not isinstance(records, list):
                errors.append(f"{path}: period {period!r} {split} must be a list (got {_type_name(records)})")
                continue
            for i, rec in enumerate(records):
                row = _row(rec, path, f"period {period!r} {split}[{i}]", k, split, periods, errors)
                if row is not None:
                    here.append(row)
        if not any(isinstance(v, list) and v for v in splits.values()):
            errors.append(f"{path}: period {period!r} has no probes")
        seen: dict[tuple[str, str], str] = {}
        for row in here:
            if row.key in seen:
                errors.append(
                    f"{path}: {row.loc} repeats (subject, relation) {row.key!r} of "
                    f"{seen[row.key]}; one fact has one probe per period"
                )
            seen.setdefault(row.key, row.loc)
        rows.append(here)
    _raise_if(errors)
    return rows


def _derive(
    row: _Row, values: dict[str, str], periods: list[str], warnings: _Warnings
) -> tuple[ProbeKind, str | None, str, str | None]:
    """(kind, previous_value, valid_from, valid_until) from the values; file fields cross-checked.

    ``values`` holds this fact's ground truth in every period that probes it. Where a neighbouring
    period does not probe the fact, the file's own field is used (there is nothing to check it with).
    """
    k, value = row.k, row.value
    rid = probe_id(periods[k], row.subject, row.relation, "storage")
    previous: str | None
    if k == 0:
        previous = None
        if row.previous_value is not None:
            warnings.add("have a previous_value in the first period (dropped)", rid)
    elif periods[k - 1] in values:
        previous = values[periods[k - 1]]
        if row.previous_value is not None and row.previous_value != previous:
            warnings.add(
                f"have a previous_value that is not the {periods[k - 1]} ground_truth (the ground_truth is used)", rid
            )
    else:
        previous = row.previous_value

    kind: ProbeKind
    if k == 0:
        kind = "new"
    elif previous is not None:
        kind = "changed" if value != previous else "unchanged"
    else:  # the fact is not probed in the period before and no previous_value: the file decides
        flag = row.is_changed if row.is_changed is not None else row.split == "changed"
        kind = "changed" if flag else "unchanged"
    # CASM's convention: period 1 lists every fact under "changed" with is_changed false.
    want_flag, want_split = (False, "changed") if k == 0 else (kind == "changed", kind)
    reason = "it is the first period" if k == 0 else f"the values say {kind}"
    if row.is_changed is not None and row.is_changed != want_flag:
        warnings.add(f"have is_changed={str(row.is_changed).lower()} although {reason} (the values are used)", rid)
    if row.split != want_split:
        warnings.add(f"are listed under {row.split!r} although {reason} (the values are used)", rid)
    if row.current_value is not None and row.current_value != value:
        warnings.add("have a current_value that differs from ground_truth (ground_truth is used)", rid)
    for label, got in row.labels.items():
        want: str | None = periods[k - 1] if label == "metadata.prev_period" else periods[k]
        if k == 0 and label == "metadata.prev_period":
            want = None
        if got != want:
            warnings.add(
                f"have {label} {got!r} although they are listed under period {periods[k]!r} (the listing is used)", rid
            )

    # valid_from: walk back while the same value is known to hold.
    j = k
    while j > 0 and values.get(periods[j - 1]) == value:
        j -= 1
    known = j == 0 or periods[j - 1] in values  # the walk stopped at a known start, not a gap
    if known:
        valid_from = periods[j]
    else:  # before j the fact is not probed; the file may name an earlier start
        given = row.valid_from
        valid_from = given if given is not None and periods.index(given) <= j else periods[j]
    if row.valid_from is not None and row.valid_from != valid_from:
        warnings.add("have a valid_from that disagrees with the ground_truth of the periods (the values are used)", rid)

    # valid_until: the first later period with another value; null in the file means "not given".
    later = [i for i in range(k + 1, len(periods)) if periods[i] in values]
    first_diff = next((i for i in later if values[periods[i]] != value), None)
    derived = periods[first_diff] if first_diff is not None else None
    end = first_diff if first_diff is not None else len(periods) - 1
    last_equal = max((i for i in later if i < end or first_diff is None), default=k)
    valid_until = derived
    if any(periods[i] not in values for i in range(k + 1, end + 1)):
        # a gap before the change is known: the file may name a change inside the gap
        given = row.valid_until
        if given is not None and last_equal < periods.index(given) <= end:
            valid_until = given
    if row.valid_until is not None and row.valid_until != valid_until:
        warnings.add(
            "have a valid_until that disagrees with the ground_truth of later periods (the values are used)", rid
        )
    return kind, previous, valid_from, valid_until


def _attribute(text: str, rows: list[_Row]) -> _Row | None:
    """The probe of the passage's period whose subject and answer both occur in the text (longest)."""
    best: _Row | None = None
    for row in rows:
        if (
            row.subject in text
            and row.value in text
            and (best is None or len(row.subject) + len(row.value) > len(best.subject) + len(best.value))
        ):
            best = row
    return best


def read_casm_built(directory: str | os.PathLike[str], cfg: DataConfig) -> Benchmark:
    """Read a directory holding the CASM project's passages.json and probes.json.

    Periods follow passages.json's key order. No cfg field changes the result (the files define
    passages and probes); cfg is validated like the other readers do. Raises DataError (one line per
    problem) for unusable data; disagreements of derived fields are in meta["warnings"].
    """
    errors = cfg.validate()
    if errors:
        raise DataError(errors)
    directory = Path(directory)
    passages_path, probes_path = directory / PASSAGES_FILE, directory / PROBES_FILE
    texts = _read_passages(passages_path)
    periods = list(texts)
    warnings = _Warnings()
    rows = _read_probes(probes_path, periods, passages_path, warnings)

    values: dict[tuple[str, str], dict[str, str]] = defaultdict(dict)
    for k, here in enumerate(rows):
        for row in here:
            values[row.key][periods[k]] = row.value

    filled = {"previous_value": 0, "valid_until": 0}
    built: list[Period] = []
    num_unattributed = 0
    for k, period in enumerate(periods):
        probes = []
        for row in rows[k]:
            kind, previous, valid_from, valid_until = _derive(row, values[row.key], periods, warnings)
            filled["previous_value"] += row.previous_value is None and previous is not None
            filled["valid_until"] += row.valid_until is None and valid_until is not None
            probes.append(
                casm_probe(
                    row, period, kind=kind, previous_value=previous, valid_from=valid_from, valid_until=valid_until
                )
            )
        passages = []
        for text in texts[period]:
            owner = _attribute(text, rows[k])
            num_unattributed += owner is None
            passages.append(
                Passage(
                    text=text,
                    subject=owner.subject if owner else UNKNOWN,
                    relation=owner.relation if owner else UNKNOWN,
                    value=owner.value if owner else UNKNOWN,
                    period=period,
                    template_id=f"casm/{PASSAGES_FILE}",
                )
            )
        built.append(Period(index=k + 1, name=period, passages=tuple(passages), probes=tuple(probes)))

    ids = [p.id for period in built for p in period.probes]
    if len(set(ids)) != len(ids):  # only ':' inside subjects or relations can make two facts collide
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(
            f"{probes_path}: probe id {dup!r} is not unique; subjects or relations containing ':' collide, rename them"
        )

    # Our "unchanged" means "not in this period's training data" (docs/data.md); CASM's thin passages
    # restate every fact in every period, so stability on them measures re-learning (LESSONS.md).
    for built_period in built:
        trained = {(p.subject, p.relation) for p in built_period.passages}
        for probe in built_period.probes:
            if probe.kind == "unchanged" and (probe.subject, probe.relation) in trained:
                warnings.add(
                    "are kind unchanged but their fact is restated in the same period's "
                    "passages (stability on them measures re-learning, not retention)",
                    probe.id,
                )

    # Storage probes: a verbatim overlap with a passage is what they test, so it is reported, not refused.
    haystack = "\x00".join(p.text for period in built for p in period.passages)
    for probe in (p for period in built for p in period.probes):
        if f"{probe.prompt} {probe.value}" in haystack:
            warnings.add(
                "have prompt + ground_truth verbatim in a training passage (kept: CASM "
                "probes test recall of the trained statement)",
                probe.id,
            )

    meta = {
        "source": CASM_BUILT_SOURCE,
        "source_files": {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (passages_path, probes_path)
        },
        "probe_family": "storage",
        "filled_from_values": filled,
        "unattributed_passages": num_unattributed,
        "counts": count_summary(built),
        "warnings": [f"{directory}: {line}" for line in warnings.lines()],
    }
    return Benchmark(
        name=CASM_BUILT_BENCHMARK_NAME,
        periods=tuple(built),
        fingerprint=fingerprint(CASM_BUILT_BENCHMARK_NAME, built),
        meta=meta,
    )
