"""From facts to a Benchmark: passages, probes, canonical serialisation, fingerprint, leakage check.

The generator (temporalwiki.generate) and the CASM raw reader (io.read_casm_raw) both turn their input
into Facts and then call ``build_benchmark``, so the two sources follow one set of rules:

- period 1 trains every fact; a later period trains only the facts whose value changed at its
  boundary (the TemporalWiki diff);
- each trained fact gets ``passages_per_fact`` passages, each from a different training template;
- probes of period 1 are every fact (kind "new"); probes of a later period are every changed fact
  ("changed") plus up to ``unchanged_probes_per_period`` facts that kept their value ("unchanged",
  never trained in that period);
- a standard probe uses a training template not used by that fact's passages in that period, and a
  fixed share of standard probes also gets a paraphrase probe from a paraphrase template.

All choices are keyed by sha256/Random seeded with (seed, subject, relation, period), never by
iteration order, so adding facts or changing the paraphrase share does not reshuffle other choices.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import asdict, fields
from typing import Any

from data.config import DataConfig
from data.errors import DataError
from data.schema import Benchmark, Fact, Passage, Period, Probe, ProbeKind
from data.templates import TemplateFamily, family_for, prompt_of, render

FORMAT_NAME = "clkit-benchmark"
FORMAT_VERSION = 1


def probe_id(period: str, subject: str, relation: str, paraphrase: bool) -> str:
    return f"{period}:{subject}:{relation}:{'para' if paraphrase else 'std'}"


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
    for later in periods[k + 1:]:
        if fact.values[later] != value:
            return later
    return None


def _template_plan(cfg: DataConfig, fact: Fact, period: str,
                   family: TemplateFamily) -> tuple[list[int], int, int]:
    """(passage template indices, standard-probe template index, paraphrase template index)."""
    rng = random.Random(f"{cfg.seed}:templates:{fact.subject}:{fact.relation}:{period}")
    order = rng.sample(range(len(family.training)), len(family.training))
    k = cfg.passages_per_fact
    return order[:k], order[k], rng.randrange(len(family.paraphrase))


def _check_facts(facts: list[Fact], periods: list[str]) -> None:
    seen: set[tuple[str, str]] = set()
    for i, fact in enumerate(facts):
        key = (fact.subject, fact.relation)
        if key in seen:
            raise DataError(f"fact {i}: duplicate (subject, relation) {key!r}")
        seen.add(key)
        if list(fact.values) != periods:
            raise DataError(f"fact {i} {key!r}: values must be given for periods {periods} in order "
                            f"(got {list(fact.values)})")
        for period, value in fact.values.items():
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"fact {i} {key!r}: value for period {period} must be a non-empty "
                                f"string (got {value!r})")


def build_benchmark(facts: list[Fact], periods: list[str], cfg: DataConfig, name: str,
                    meta: dict[str, Any]) -> Benchmark:
    """Passages and probes of every period from facts whose ``values`` follow ``periods``.

    Uses cfg.seed, cfg.passages_per_fact, cfg.unchanged_probes_per_period and cfg.paraphrase_share.
    meta is stored as given, plus a "counts" entry; it is not part of the fingerprint.
    """
    _check_facts(facts, periods)
    families = {fact.relation: family_for(fact.relation) for fact in facts}
    built: list[Period] = []
    for k, period in enumerate(periods):
        previous = periods[k - 1] if k > 0 else None
        if previous is None:
            trained = list(facts)
            probed: list[tuple[Fact, ProbeKind]] = [(f, "new") for f in facts]
        else:
            trained = [f for f in facts if f.values[period] != f.values[previous]]
            unchanged = [f for f in facts if f.values[period] == f.values[previous]]
            unchanged.sort(key=lambda f: _rank_key(cfg.seed, "unchanged", period, f.subject,
                                                   f.relation))
            picked = {(f.subject, f.relation)
                      for f in unchanged[: cfg.unchanged_probes_per_period]}
            probed = [(f, "changed") for f in trained]
            # Keep fact order within the kind so files read naturally.
            probed += [(f, "unchanged") for f in facts
                       if (f.subject, f.relation) in picked]

        passages: list[Passage] = []
        for fact in trained:
            family = families[fact.relation]
            passage_templates, _, _ = _template_plan(cfg, fact, period, family)
            value = fact.values[period]
            for t in passage_templates:
                passages.append(Passage(
                    text=render(family.training[t], period, fact.subject, value),
                    subject=fact.subject, relation=fact.relation, value=value, period=period,
                    template_id=family.training_id(t)))

        # Which standard probes also get a paraphrase: an exact share per kind, chosen by hash rank.
        with_paraphrase: set[tuple[str, str]] = set()
        for kind in ("new", "changed", "unchanged"):
            of_kind = [f for f, kd in probed if kd == kind]
            of_kind.sort(key=lambda f: _rank_key(cfg.seed, "paraphrase", period, f.subject,
                                                 f.relation))
            count = _round_half_up(cfg.paraphrase_share * len(of_kind))
            with_paraphrase.update((f.subject, f.relation) for f in of_kind[:count])

        probes: list[Probe] = []
        for fact, kind in probed:
            family = families[fact.relation]
            _, probe_t, para_t = _template_plan(cfg, fact, period, family)
            variants = [(False, family.training[probe_t], family.training_id(probe_t))]
            if (fact.subject, fact.relation) in with_paraphrase:
                variants.append((True, family.paraphrase[para_t], family.paraphrase_id(para_t)))
            for paraphrase, template, template_id in variants:
                probes.append(Probe(
                    id=probe_id(period, fact.subject, fact.relation, paraphrase),
                    subject=fact.subject, relation=fact.relation, value=fact.values[period],
                    period=period, valid_from=valid_from(fact, periods, k),
                    valid_until=valid_until(fact, periods, k),
                    previous_value=fact.values[previous] if previous is not None else None,
                    kind=kind, paraphrase=paraphrase,
                    prompt=prompt_of(template, period, fact.subject), template_id=template_id))
        built.append(Period(index=k + 1, name=period, passages=tuple(passages), probes=tuple(probes)))

    ids = [p.id for period in built for p in period.probes]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"probe id {dup!r} is not unique; subjects or relations containing ':' "
                        "collide, rename them")
    meta = dict(meta)
    meta["counts"] = count_summary(built)
    return Benchmark(name=name, periods=tuple(built), fingerprint=fingerprint(name, built), meta=meta)


def count_summary(periods: Iterable[Period]) -> dict[str, dict[str, int]]:
    """Per period: passages, trained facts, standard probes by kind, paraphrase probes."""
    summary: dict[str, dict[str, int]] = {}
    for period in periods:
        row = {"passages": len(period.passages),
               "trained_facts": len({(p.subject, p.relation) for p in period.passages}),
               "paraphrase": sum(p.paraphrase for p in period.probes)}
        for kind in ("new", "changed", "unchanged"):
            row[kind] = sum(1 for p in period.probes if p.kind == kind and not p.paraphrase)
        summary[period.name] = row
    return summary


# ---------------------------------------------------------------------------------------------
# Canonical serialisation


def period_to_json(period: Period) -> dict[str, Any]:
    return {"index": period.index, "name": period.name,
            "passages": [asdict(p) for p in period.passages],
            "probes": [asdict(p) for p in period.probes]}


def content_json(name: str, periods: Iterable[Period]) -> dict[str, Any]:
    """What the fingerprint covers: the name and every passage and probe (not meta)."""
    return {"name": name, "periods": [period_to_json(p) for p in periods]}


def fingerprint(name: str, periods: Iterable[Period]) -> str:
    canonical = json.dumps(content_json(name, periods), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


PASSAGE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Passage))
PROBE_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Probe))


# ---------------------------------------------------------------------------------------------
# Train/test disjointness


def check_no_leakage(bench: Benchmark) -> None:
    """Raise DataError if any probe's ``prompt + " " + value`` occurs verbatim in a training passage.

    Passages of every period count, not only the probe's own: a model that has seen the exact
    completion anywhere would be tested on recall of a string instead of on the fact.
    """
    # One joined haystack makes the check a fast substring search per probe; the separator cannot
    # occur in a needle built from printable text.
    sep = "\x00"
    haystack = sep.join(p.text for period in bench.periods for p in period.passages)
    for probe in bench.all_probes():
        needle = probe.prompt + " " + probe.value
        if needle in haystack:
            where = next(p for period in bench.periods for p in period.passages if needle in p.text)
            raise DataError(f"probe {probe.id}: prompt + value {needle!r} appears verbatim in a "
                            f"training passage of period {where.period} (template "
                            f"{where.template_id}); probes must use wording never trained on")
