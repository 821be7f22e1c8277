"""From facts to a Benchmark: passages, probes, canonical serialisation, fingerprint, leakage check.

The generator (temporalwiki.generate) and the CASM raw reader (io.read_casm_raw) both turn their input
into Facts and then call ``build_benchmark``, so the two sources follow one set of rules:

- period 1 trains every fact; a later period trains only the facts whose value changed at its
  boundary (the TemporalWiki diff);
- each relation's wordings are split once per data seed into a training pool and a held-out pool
  (``template_split``); each trained fact gets ``passages_per_fact`` passages, each from a different
  training wording, and a ``qa_share`` of facts also gets question-answer items;
- probes of period 1 are every fact (kind "new"); probes of a later period are every changed fact
  ("changed") plus up to ``unchanged_probes_per_period`` facts that kept their value ("unchanged",
  never trained in that period);
- each probed fact gets a *storage* probe (the cloze of a wording trained for it with this value)
  and, for an ``extraction_share`` of them, an *extraction* probe (a held-out wording).

All choices are keyed by sha256/Random seeded with (seed, subject, relation, period), never by
iteration order, so adding facts or changing a share does not reshuffle other choices.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from data.config import DataConfig
from data.errors import DataError
from data.schema import Benchmark, Fact, Passage, Period, Probe, ProbeFamily, ProbeKind
from data.templates import WORDINGS_PER_RELATION, family_for, prompt_of, render

FORMAT_NAME = "clkit-benchmark"
# 2: probes carry `family` (storage | extraction) instead of `paraphrase`. Version 1 files still read
# (data/io.py), paraphrase=true as extraction and false as storage.
FORMAT_VERSION = 2


def probe_id(period: str, subject: str, relation: str, family: str) -> str:
    return f"{period}:{subject}:{relation}:{family}"


def _rank_key(*parts: object) -> str:
    """A stable pseudo-random sort key (hash of the parts), independent of PYTHONHASHSEED."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even, which makes "share of n" jump oddly with n.
    return int(x + 0.5)


def valid_from(fact: Fact, periods: list[str], k: int) -> str:
    """First period of the run of periods, ending at periods[k], in which the value is the same."""
    value = fact.values[periods[k]]
    start = k
    while start > 0 and fact.values[periods[start - 1]] == value:
        start -= 1
    return periods[start]


def valid_until(fact: Fact, periods: list[str], k: int) -> str | None:
    """First period after periods[k] whose value differs; None when the value holds to the end."""
    value = fact.values[periods[k]]
    for later in periods[k + 1 :]:
        if fact.values[later] != value:
            return later
    return None


def template_split(cfg: DataConfig) -> tuple[list[int], list[int]]:
    """(training wording positions, held-out wording positions) of every relation's pool.

    One draw per data seed, the same positions for every relation, so a held-out wording (a shared
    frame included) renders no training text for any relation, fact or period.
    """
    rng = random.Random(f"{cfg.seed}:template-split")
    order = rng.sample(range(WORDINGS_PER_RELATION), WORDINGS_PER_RELATION)
    held_out = sorted(order[: cfg.num_heldout_templates])
    training = sorted(order[cfg.num_heldout_templates : cfg.num_heldout_templates + cfg.num_training_templates])
    return training, held_out


@dataclass(frozen=True)
class _Plan:
    passages: list[int]  # wording positions of this fact's passages in this period
    extraction: int  # the held-out wording position of its extraction probe in this period


def _template_plan(cfg: DataConfig, fact: Fact, period: str, split: tuple[list[int], list[int]]) -> _Plan:
    """Which wordings render this fact's passages in ``period`` and which one its extraction probe uses.

    The storage probe's wording is ``passages[0]`` of the period in which the value was last trained.
    """
    training, held_out = split
    rng = random.Random(f"{cfg.seed}:templates:{fact.subject}:{fact.relation}:{period}")
    return _Plan(rng.sample(training, cfg.passages_per_fact), rng.choice(held_out))


def _check_facts(facts: list[Fact], periods: list[str]) -> None:
    seen: set[tuple[str, str]] = set()
    for i, fact in enumerate(facts):
        key = (fact.subject, fact.relation)
        if key in seen:
            raise DataError(f"fact {i}: duplicate (subject, relation) {key!r}")
        seen.add(key)
        if list(fact.values) != periods:
            raise DataError(
                f"fact {i} {key!r}: values must be given for periods {periods} in order (got {list(fact.values)})"
            )
        for period, value in fact.values.items():
            if not isinstance(value, str) or not value.strip():
                raise DataError(
                    f"fact {i} {key!r}: value for period {period} must be a non-empty string (got {value!r})"
                )


def build_benchmark(
    facts: list[Fact], periods: list[str], cfg: DataConfig, name: str, meta: dict[str, Any]
) -> Benchmark:
    """Passages and probes of every period from facts whose ``values`` follow ``periods``.

    Uses cfg.seed, the template counts, passages_per_fact, qa_share, unchanged_probes_per_period and
    extraction_share. meta is stored as given, plus "counts" and "template_split"; it is not part of
    the fingerprint.
    """
    _check_facts(facts, periods)
    families = {fact.relation: family_for(fact.relation) for fact in facts}
    split = template_split(cfg)
    by_qa_rank = sorted(facts, key=lambda f: _rank_key(cfg.seed, "qa", f.subject, f.relation))
    qa_facts = {(f.subject, f.relation) for f in by_qa_rank[: _round_half_up(cfg.qa_share * len(facts))]}
    built: list[Period] = []
    for k, period in enumerate(periods):
        previous = periods[k - 1] if k > 0 else None
        if previous is None:
            trained = list(facts)
            probed: list[tuple[Fact, ProbeKind]] = [(f, "new") for f in facts]
        else:
            trained = [f for f in facts if f.values[period] != f.values[previous]]
            unchanged = [f for f in facts if f.values[period] == f.values[previous]]
            unchanged.sort(key=lambda f: _rank_key(cfg.seed, "unchanged", period, f.subject, f.relation))
            picked = {(f.subject, f.relation) for f in unchanged[: cfg.unchanged_probes_per_period]}
            probed = [(f, "changed") for f in trained]
            # Keep fact order within the kind so files read naturally.
            probed += [(f, "unchanged") for f in facts if (f.subject, f.relation) in picked]

        passages: list[Passage] = []
        for fact in trained:
            family = families[fact.relation]
            value = fact.values[period]
            texts = [
                (family.wordings[t], family.wording_id(t)) for t in _template_plan(cfg, fact, period, split).passages
            ]
            if (fact.subject, fact.relation) in qa_facts:
                texts += [(q, family.question_id(i)) for i, q in enumerate(family.questions)]
            for template, template_id in texts:
                passages.append(
                    Passage(
                        text=render(template, period, fact.subject, value),
                        subject=fact.subject,
                        relation=fact.relation,
                        value=value,
                        period=period,
                        template_id=template_id,
                    )
                )

        # Which probed facts also get an extraction probe: an exact share per kind, by hash rank.
        with_extraction: set[tuple[str, str]] = set()
        for kind in ("new", "changed", "unchanged"):
            of_kind = [f for f, kd in probed if kd == kind]
            of_kind.sort(key=lambda f: _rank_key(cfg.seed, "extraction", period, f.subject, f.relation))
            count = _round_half_up(cfg.extraction_share * len(of_kind))
            with_extraction.update((f.subject, f.relation) for f in of_kind[:count])

        probes: list[Probe] = []
        for fact, kind in probed:
            family = families[fact.relation]
            since = valid_from(fact, periods, k)
            # The value was last trained in `since` (period 1 trains everything, later periods every
            # change), so a storage probe of an unchanged fact is a wording trained then, dated now.
            stored = _template_plan(cfg, fact, since, split).passages[0]
            variants: list[tuple[ProbeFamily, int]] = [("storage", stored)]
            if (fact.subject, fact.relation) in with_extraction:
                variants.append(("extraction", _template_plan(cfg, fact, period, split).extraction))
            for probe_family, t in variants:
                probes.append(
                    Probe(
                        id=probe_id(period, fact.subject, fact.relation, probe_family),
                        subject=fact.subject,
                        relation=fact.relation,
                        value=fact.values[period],
                        period=period,
                        valid_from=since,
                        valid_until=valid_until(fact, periods, k),
                        previous_value=fact.values[previous] if previous is not None else None,
                        kind=kind,
                        family=probe_family,
                        prompt=prompt_of(family.wordings[t], period, fact.subject),
                        template_id=family.wording_id(t),
                    )
                )
        built.append(Period(index=k + 1, name=period, passages=tuple(passages), probes=tuple(probes)))

    ids = [p.id for period in built for p in period.probes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"probe id {dup!r} is not unique; subjects or relations containing ':' collide, rename them")
    meta = dict(meta)
    meta["counts"] = count_summary(built)
    meta["template_split"] = {"training": [f"w{i}" for i in split[0]], "held_out": [f"w{i}" for i in split[1]]}
    return Benchmark(name=name, periods=tuple(built), fingerprint=fingerprint(name, built), meta=meta)


def count_summary(periods: Iterable[Period]) -> dict[str, dict[str, int]]:
    """Per period: passages (QA items among them), trained facts, storage probes by kind, extraction probes."""
    summary: dict[str, dict[str, int]] = {}
    for period in periods:
        row = {
            "passages": len(period.passages),
            "qa_items": sum(1 for p in period.passages if "/q" in p.template_id),
            "trained_facts": len({(p.subject, p.relation) for p in period.passages}),
            "extraction": sum(p.family == "extraction" for p in period.probes),
        }
        for kind in ("new", "changed", "unchanged"):
            row[kind] = sum(1 for p in period.probes if p.kind == kind and p.family == "storage")
        summary[period.name] = row
    return summary


# ---------------------------------------------------------------------------------------------
# Canonical serialisation


def period_to_json(period: Period) -> dict[str, Any]:
    return {
        "index": period.index,
        "name": period.name,
        "passages": [asdict(p) for p in period.passages],
        "probes": [asdict(p) for p in period.probes],
    }


def content_json(name: str, periods: Iterable[Period]) -> dict[str, Any]:
    """What the fingerprint covers: the name and every passage and probe (not meta)."""
    return {"name": name, "periods": [period_to_json(p) for p in periods]}


def fingerprint(name: str, periods: Iterable[Period]) -> str:
    canonical = json.dumps(content_json(name, periods), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


PASSAGE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Passage))
PROBE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Probe))


# ---------------------------------------------------------------------------------------------
# Train/test disjointness


def check_no_leakage(bench: Benchmark) -> None:
    """Raise DataError if an extraction probe's ``prompt + " " + value`` occurs verbatim in a training
    passage of any period.

    Passages of every period count, not only the probe's own: a model that has seen the exact
    completion anywhere would be tested on recall of a string instead of on the fact. Storage probes
    are the cloze of a trained sentence by design, so they are not checked here.
    """
    # One joined haystack makes the check a fast substring search per probe; the separator cannot
    # occur in a needle built from printable text.
    sep = "\x00"
    haystack = sep.join(p.text for period in bench.periods for p in period.passages)
    for probe in bench.all_probes():
        if probe.family != "extraction":
            continue
        needle = probe.prompt + " " + probe.value
        if needle in haystack:
            where = next(p for period in bench.periods for p in period.passages if needle in p.text)
            raise DataError(
                f"extraction probe {probe.id}: prompt + value {needle!r} appears verbatim "
                f"in a training passage of period {where.period} (template "
                f"{where.template_id}); extraction probes must use wording never trained on"
            )
