"""Continual-learning metrics from per-probe scores (pure numpy; formulas in docs/metrics.md).

Input everywhere is one dict of per-probe scores per evaluated model state:
``rows[0]`` is the base model before any training and ``rows[k]`` (k = 1..T) the model after
training period k. Every row must score every probe: a metric that compares rows is only
meaningful when the rows scored the same probes, so a missing probe id is a ValueError, never a
silently smaller mean.

Every metric is computed per probe family (data/schema.py: storage = the cloze of a trained
sentence, extraction = a wording never trained on) and carries the family in its key; the two are
never averaged together. Two kinds of metric are derived:

* matrix metrics (ACC, BWT, FWT, forgetting) from the score matrix R (rows = model states,
  columns = the periods whose probes are asked), one matrix per family;
* subset metrics (plasticity, stability, temporal recall) that pick probes by kind / validity
  inside one row. These are computed from per-probe scores directly, not from R, because R
  averages over all kinds of a period and would mix re-trained and retained facts. Each comes as
  a per-period list, its macro mean over periods, and the pooled (micro) mean over every probe
  the list used, with the counts.

Every value returned by ``derive_metrics`` is JSON-safe: NaN (nothing to average) becomes None.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from data.schema import PROBE_FAMILIES, PROBE_KINDS, Probe
from eval_and_metrics.scoring import normalize_answer

Rows = Sequence[Mapping[str, float]]

# Kinds whose value is in the period's own training data: what plasticity measures. Period 1
# holds only "new" probes, later periods "changed" ones (and "new" ones if a benchmark introduces
# subjects later; those are also learned in that period, so they belong here too).
PLASTICITY_KINDS: frozenset[str] = frozenset({"new", "changed"})
# Kind whose value is NOT re-trained in the period: what stability measures (see docs/metrics.md).
STABILITY_KINDS: frozenset[str] = frozenset({"unchanged"})


# ----------------------------------------------------------------------------------------------
# validation and small helpers


def _check_inputs(rows: Rows, probes: Sequence[Probe], period_names: Sequence[str]) -> None:
    """Raise ValueError on inputs no metric can be computed from, naming what to fix."""
    if not period_names:
        raise ValueError("period_names is empty: need at least one period")
    if len(set(period_names)) != len(period_names):
        raise ValueError(f"period_names has duplicates: {list(period_names)}")
    if len(rows) != len(period_names) + 1:
        raise ValueError(
            f"got {len(rows)} score rows for {len(period_names)} periods: need T+1 = "
            f"{len(period_names) + 1} (row 0 = base model, row k = after period k)"
        )
    known = set(period_names)
    seen: set[str] = set()
    for p in probes:
        if p.id in seen:
            raise ValueError(f"duplicate probe id {p.id!r}: it would be counted twice")
        seen.add(p.id)
        if p.period not in known:
            raise ValueError(f"probe {p.id!r} has period {p.period!r}, not in {list(period_names)}")
        if p.valid_until is not None and p.valid_until not in known:
            raise ValueError(f"probe {p.id!r} has valid_until {p.valid_until!r}, not in {list(period_names)}")


def _check_rows_cover(rows: Rows, probes: Sequence[Probe]) -> None:
    """Every row must hold a finite score for every probe (same probes across rows)."""
    for k, row in enumerate(rows):
        for p in probes:
            if p.id not in row:
                raise ValueError(
                    f"score row {k} has no score for probe {p.id!r}: every row must score the same "
                    f"probes (re-run the evaluation of that row)"
                )
            if not math.isfinite(float(row[p.id])):
                raise ValueError(f"score row {k} has a non-finite score for probe {p.id!r}")


def _mean(values: Sequence[float]) -> float:
    """Mean of the finite values; NaN when there are none (no RuntimeWarning, unlike nanmean)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else math.nan


def _subset_score(row: Mapping[str, float], subset: Sequence[Probe]) -> float:
    """Mean score of one row over a subset of probes; NaN for an empty subset."""
    if not subset:
        return math.nan
    return float(np.mean([float(row[p.id]) for p in subset]))


def _json_safe(x: Any) -> Any:
    """Floats (numpy too) as Python floats, NaN/inf as None, recursing through lists and dicts."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


# ----------------------------------------------------------------------------------------------
# the score matrix and the matrix metrics


def score_matrix(
    rows: Rows,
    probes: Sequence[Probe],
    period_names: Sequence[str],
    select: Callable[[Probe], bool] = lambda p: True,
) -> np.ndarray:
    """R of shape (T+1, T): R[k, t] = mean score in row k over period t's probes with select(p).

    Row index k is the 1-based period after which the row was scored (0 = base); column t is the
    0-based position of the probe's period in ``period_names``. NaN where no probe is selected.
    Raises ValueError if any row lacks a selected probe id.
    """
    _check_inputs(rows, probes, period_names)
    chosen = [p for p in probes if select(p)]
    _check_rows_cover(rows, chosen)
    by_period = {name: [p for p in chosen if p.period == name] for name in period_names}
    matrix = np.full((len(rows), len(period_names)), np.nan, dtype=float)
    for k, row in enumerate(rows):
        for t, name in enumerate(period_names):
            matrix[k, t] = _subset_score(row, by_period[name])
    return matrix


def _check_matrix(r: np.ndarray) -> int:
    """Return T for a (T+1, T) matrix; assert the shape (an invariant of score_matrix)."""
    assert r.ndim == 2 and r.shape[0] == r.shape[1] + 1, f"R must be (T+1, T), got {r.shape}"
    return r.shape[1]


def average_accuracy(r: np.ndarray) -> float:
    """ACC = 1/T * sum_{t=1..T} R[T][t]: final-model score averaged over periods."""
    t_count = _check_matrix(r)
    return _mean(r[t_count, :].tolist())


def backward_transfer(r: np.ndarray) -> float:
    """BWT = 1/(T-1) * sum_{t=1..T-1} (R[T][t] - R[t][t]); NaN for T = 1.

    1-based formula on a 0-based array: period t is column t-1 and the row after period t is row t.
    """
    t_count = _check_matrix(r)
    terms = [r[t_count, t - 1] - r[t, t - 1] for t in range(1, t_count)]
    return _mean(terms)


def forward_transfer(r: np.ndarray) -> float:
    """FWT = 1/(T-1) * sum_{t=2..T} (R[t-1][t] - R[0][t]); NaN for T = 1.

    Lopez-Paz & Ranzato (2017) with the base model (row 0) as the reference b_t: how much training
    up to period t-1 already helps on period t's probes, before period t is seen.
    """
    t_count = _check_matrix(r)
    terms = [r[t - 1, t - 1] - r[0, t - 1] for t in range(2, t_count + 1)]
    return _mean(terms)


def forgetting(r: np.ndarray, first_row: int | None = None) -> float:
    """F = 1/(T-1) * sum_{t=1..T-1} (max_{l=t..T-1} R[l][t] - R[T][t]): ours, the default.

    The best score a period ever had after it was trained (rows t..T-1) minus its final score.
    ``first_row=1`` gives Chaudhry et al. 2018's exact form, max over l = 1..T-1: every trained model
    before the last, including those from before period t was trained. The two differ here because a
    period's unchanged facts can be answered before it is trained (docs/metrics.md names both).
    NaN for T = 1.
    """
    t_count = _check_matrix(r)
    terms = []
    for t in range(1, t_count):
        column = r[(t if first_row is None else first_row) : t_count, t - 1]  # rows l = t (or first_row)..T-1
        best = np.nan if np.all(np.isnan(column)) else float(np.nanmax(column))
        terms.append(best - r[t_count, t - 1])
    return _mean(terms)


# ----------------------------------------------------------------------------------------------
# subset metrics, from per-probe scores


def _per_period_subset(
    rows: Rows,
    probes: Sequence[Probe],
    period_names: Sequence[str],
    pick: Callable[[Probe, int], bool],
) -> list[float]:
    """For k = 1..T: mean score in row k over the probes with pick(probe, k); NaN where none."""
    return [_subset_score(rows[k], [p for p in probes if pick(p, k)]) for k in range(1, len(period_names) + 1)]


def _pooled_subset(
    rows: Rows,
    probes: Sequence[Probe],
    period_names: Sequence[str],
    pick: Callable[[Probe, int], bool],
) -> tuple[float, int]:
    """(pooled mean, n) over every (k, probe) pair with pick(probe, k), k = 1..T; (NaN, 0) if none.

    The micro counterpart of averaging _per_period_subset: each probe counts once per row it is
    picked in, so a period with 6 probes weighs a quarter of one with 24.
    """
    scores = [float(rows[k][p.id]) for k in range(1, len(period_names) + 1) for p in probes if pick(p, k)]
    return (float(np.mean(scores)) if scores else math.nan), len(scores)


def _counts(probes: Sequence[Probe], period_names: Sequence[str], pick: Callable[[Probe, int], bool]) -> list[int]:
    return [sum(1 for p in probes if pick(p, k)) for k in range(1, len(period_names) + 1)]


def subset_pickers(period_names: Sequence[str], family: str) -> dict[str, Callable[[Probe, int], bool]]:
    """The probe selections of plasticity, stability and temporal recall for one family: each picks
    (probe, k) pairs, k being the row (the model after period k) that scores the probe."""
    if family not in PROBE_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(PROBE_FAMILIES)} (got {family!r})")
    index = {name: i + 1 for i, name in enumerate(period_names)}

    def learned(p: Probe, k: int) -> bool:
        return p.family == family and index[p.period] == k and p.kind in PLASTICITY_KINDS

    def kept(p: Probe, k: int) -> bool:
        return p.family == family and index[p.period] == k and p.kind in STABILITY_KINDS

    def formerly_true(p: Probe, k: int) -> bool:
        return p.family == family and index[p.period] < k and p.valid_until is not None and index[p.valid_until] <= k

    return {"plasticity": learned, "stability": kept, "temporal_recall": formerly_true}


def plasticity(
    rows: Rows, probes: Sequence[Probe], period_names: Sequence[str], family: str = "storage"
) -> list[float]:
    """For k = 1..T: score on period k's probes of one family and kind new/changed, after period k."""
    return _per_period_subset(rows, probes, period_names, subset_pickers(period_names, family)["plasticity"])


def stability(rows: Rows, probes: Sequence[Probe], period_names: Sequence[str], family: str = "storage") -> list[float]:
    """For k = 1..T: score on period k's "unchanged" probes of one family after period k (NaN if none).

    Only facts absent from period k's training data count: a re-trained fact measures
    re-learning, not retention.
    """
    return _per_period_subset(rows, probes, period_names, subset_pickers(period_names, family)["stability"])


def temporal_recall(
    rows: Rows, probes: Sequence[Probe], period_names: Sequence[str], family: str = "storage"
) -> list[float]:
    """For k = 1..T: score after period k on probes of one family of earlier periods (t < k) whose
    value no longer holds at period k (valid_until is set and index(valid_until) <= k). NaN if none
    (always for k = 1)."""
    return _per_period_subset(rows, probes, period_names, subset_pickers(period_names, family)["temporal_recall"])


def routing_accuracy(routed: Mapping[str, str] | None, probes: Sequence[Probe]) -> float | None:
    """Fraction of probes whose routed memory version (a period name) equals the probe's period.

    ``routed`` maps probe id -> the period name of the memory version the router chose at
    evaluation time (from the prompt alone). None means the method does not route: the metric is
    then None, never NaN. A routing method must route every probe (ValueError otherwise).
    """
    if routed is None or not probes:
        return None
    missing = [p.id for p in probes if p.id not in routed]
    if missing:
        raise ValueError(
            f"routing decisions missing for {len(missing)} probe(s), e.g. {missing[0]!r}: a "
            f"routing method must record a routed version for every probe it answers"
        )
    return float(np.mean([routed[p.id] == p.period for p in probes]))


# ----------------------------------------------------------------------------------------------
# what a wrong temporal answer is (DyKnow, Mousavi et al. 2024)


def value_history(probes: Sequence[Probe], period_names: Sequence[str]) -> dict[tuple[str, str], dict[int, str]]:
    """(subject, relation) -> {period index: value} as the probes state it (each probe's own period, and
    its previous_value for the period before it)."""
    index = {name: i + 1 for i, name in enumerate(period_names)}
    history: dict[tuple[str, str], dict[int, str]] = {}
    for p in probes:
        values = history.setdefault((p.subject, p.relation), {})
        values[index[p.period]] = p.value
        if p.previous_value is not None and index[p.period] > 1:
            values.setdefault(index[p.period] - 1, p.previous_value)
    return history


def answer_kind(prediction: str, probe: Probe, history: Mapping[int, str], asked: int, newest: int) -> str:
    """DyKnow's three outcomes of one answer to a question about period `asked`, given by the model after
    period `newest`: "correct" (the value at `asked`), "outdated" (a value the fact held in an earlier
    period, and not also its value at `asked`), "irrelevant" (anything else). Answers with a value of a
    later period (asked < t <= newest) are "later": the overwriting that temporal recall counts as wrong.
    Matching is SQuAD-normalised exact match, as em."""
    said = normalize_answer(prediction)
    gold = normalize_answer(probe.value)
    if said == gold:
        return "correct"
    # A value that held both before and after `asked` (A, B, A) is "later": what the model was taught
    # last explains it better than what it was taught first.
    if said and any(normalize_answer(v) == said for t, v in history.items() if asked < t <= newest):
        return "later"
    if said and any(normalize_answer(v) == said for t, v in history.items() if t < asked):
        return "outdated"
    return "irrelevant"


def answer_kind_rates(
    rows_pred: Sequence[Mapping[str, str]], probes: Sequence[Probe], period_names: Sequence[str], family: str
) -> dict[str, Any]:
    """Outdated answers after each period k, on the probes of period k whose value changed in k (the facts
    just taught over an older value): per k the rates of correct / outdated / irrelevant answers, their
    macro mean over periods, the pooled rates and counts. Also, on temporal recall's probes (earlier
    periods' values that no longer hold at k), the rate of answers that give a later value instead."""
    index = {name: i + 1 for i, name in enumerate(period_names)}
    history = value_history(probes, period_names)
    out: dict[str, Any] = {}
    periods = range(1, len(period_names) + 1)
    pickers = subset_pickers(period_names, family)
    views = {
        # the newest facts: does the model still answer with the value it held before?
        "outdated": lambda p, k: p.family == family and index[p.period] == k and p.kind == "changed",
        # facts of earlier periods that have since changed: does it answer the past with the present?
        "overwritten": pickers["temporal_recall"],
    }
    for view, pick in views.items():
        per_k: dict[str, list[float]] = {kind: [] for kind in ("correct", "outdated", "later", "irrelevant")}
        counts, pooled = [], {kind: 0 for kind in per_k}
        for k in periods:
            picked = [p for p in probes if pick(p, k)]
            kinds = [
                answer_kind(rows_pred[k][p.id], p, history[(p.subject, p.relation)], index[p.period], k) for p in picked
            ]
            counts.append(len(kinds))
            for kind, fractions in per_k.items():
                n = sum(1 for x in kinds if x == kind)
                pooled[kind] += n
                fractions.append(n / len(kinds) if kinds else math.nan)
        total = sum(counts)
        key = f"{view}_{family}"
        # the headline of each view: stale answers to new facts, present answers to past questions
        headline = "outdated" if view == "outdated" else "later"
        out[key] = per_k[headline]
        out[f"{key}_mean"] = _mean(per_k[headline])
        out[f"{key}_pooled"] = pooled[headline] / total if total else math.nan
        out[f"{key}_n"] = total
        out[f"{key}_counts"] = counts
        out[f"{key}_answers"] = {kind: per_k[kind] for kind in per_k}
    return out


# ----------------------------------------------------------------------------------------------
# everything at once, JSON-safe


def _count_probes(probes: Sequence[Probe]) -> dict[str, Any]:
    counts: dict[str, Any] = {"total": len(probes)}
    for family in PROBE_FAMILIES:
        counts[family] = {kind: sum(1 for p in probes if p.family == family and p.kind == kind) for kind in PROBE_KINDS}
        counts[family]["total"] = sum(1 for p in probes if p.family == family)
    return counts


def _matrix_metrics(r: np.ndarray, suffix: str) -> dict[str, float]:
    return {
        f"acc{suffix}": average_accuracy(r),
        f"bwt{suffix}": backward_transfer(r),
        f"fwt{suffix}": forward_transfer(r),
        f"forgetting{suffix}": forgetting(r),
        f"forgetting_chaudhry{suffix}": forgetting(r, first_row=1),
    }


def derive_metrics(
    rows_em: Rows,
    rows_f1: Rows,
    probes: Sequence[Probe],
    period_names: Sequence[str],
    rows_pred: Sequence[Mapping[str, str]] | None = None,
) -> dict[str, Any]:
    """All continual-learning metrics of one run, JSON-safe (NaN -> None). Keys: docs/metrics.md.

    Every temporal key names its family (``acc_storage``, ``plasticity_extraction_pooled``, ...).
    With the predictions (rows_pred, probe id -> answer per row) the outdated and overwritten answer
    rates are added (answer_kind_rates).
    """
    for rows in (rows_em, rows_f1):
        _check_inputs(rows, probes, period_names)
        _check_rows_cover(rows, probes)

    out: dict[str, Any] = {"period_names": list(period_names)}
    for family in PROBE_FAMILIES:

        def of_family(p: Probe, family: str = family) -> bool:
            return p.family == family

        r_em = score_matrix(rows_em, probes, period_names, of_family)
        r_f1 = score_matrix(rows_f1, probes, period_names, of_family)
        out[f"matrix_{family}_em"] = r_em
        out[f"matrix_{family}_f1"] = r_f1
        out.update(_matrix_metrics(r_em, f"_{family}"))
        out.update(_matrix_metrics(r_f1, f"_{family}_f1"))
        for name, pick in subset_pickers(period_names, family).items():
            key = f"{name}_{family}"
            per_k_em = _per_period_subset(rows_em, probes, period_names, pick)
            per_k_f1 = _per_period_subset(rows_f1, probes, period_names, pick)
            out[key] = per_k_em
            out[f"{key}_counts"] = _counts(probes, period_names, pick)
            out[f"{key}_mean"] = _mean(per_k_em)
            out[f"{key}_mean_f1"] = _mean(per_k_f1)
            out[f"{key}_pooled"], out[f"{key}_n"] = _pooled_subset(rows_em, probes, period_names, pick)
            out[f"{key}_pooled_f1"], _ = _pooled_subset(rows_f1, probes, period_names, pick)
            if name == "temporal_recall":
                out[f"{key}_final"] = per_k_em[-1]
                out[f"{key}_final_f1"] = per_k_f1[-1]
        if rows_pred is not None:
            missing = [(k, p.id) for k, row in enumerate(rows_pred) for p in probes if p.id not in row]
            if missing:
                raise ValueError(f"prediction row {missing[0][0]} has no answer for probe {missing[0][1]!r}")
            out.update(answer_kind_rates(rows_pred, probes, period_names, family))
    out["num_probes"] = _count_probes(probes)
    return _json_safe(out)
