"""Grouping runs that are seeds of one setup and aggregating them: mean and 95% t-interval per metric."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from eval_and_metrics.report.read import variant_tree
from eval_and_metrics.report.records import (
    CONFIDENCE,
    LANDSCAPE_KEYS,
    PER_PERIOD_KEYS,
    SCALAR_KEYS,
    STREAM_SUMMARIES,
    Run,
)

# ------------------------------------------------------------------------------------------
# aggregation


def mean_ci(values: Iterable[Any], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and the t-interval of the mean over finite values: mean ± t_{(1+c)/2, n-1} * sd / sqrt(n).

    sd uses ddof = 1. n < 2 gives no interval (half = None); n = 0 gives mean None.
    """
    from scipy import stats

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    out: dict[str, Any] = {"n": n, "mean": None, "sd": None, "half": None, "low": None, "high": None, "values": xs}
    if n == 0:
        return out
    mean = sum(xs) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
        out.update(sd=sd, half=half, low=mean - half, high=mean + half)
    return out


@dataclass
class Group:
    """Runs that are seeds of one setup: benchmark x model x method x config variant.

    For a stream (kind "stream"), `metrics` holds "higher_is_better_summary.<key>" and
    "lower_is_better_summary.<key>", `matrix_mean`/`matrix_half` the primary-metric matrix R, and
    `stream` the per-task aggregates (final score, base-solved counts, every scorer metric per row).
    """

    benchmark: str
    model: str
    method: str
    variant: str
    label: str
    period_names: list[str]
    runs: list[Run]  # every run of the group, whatever its status
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_period: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    matrix_mean: list[list[float | None]] | None = None
    matrix_half: list[list[float | None]] | None = None
    forgetting_curve: list[dict[str, Any]] = field(default_factory=list)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    lm_eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    landscape: dict[str, list[dict[str, Any] | None]] = field(default_factory=dict)
    kind: str = "temporal"
    stream: dict[str, Any] = field(default_factory=dict)
    # the retention track: {"task/metric": {higher_is_better, base, drop: [per row], rel_drop_final, item_ci}}
    retention: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def complete(self) -> list[Run]:
        return [r for r in self.runs if r.status == "complete"]

    @property
    def n(self) -> int:
        return len(self.complete)

    @property
    def seeds(self) -> list[Any]:
        return sorted((r.seed for r in self.complete), key=lambda s: (s is None, s))

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "model": self.model,
            "method": self.method,
            "variant": self.variant,
            "label": self.label,
            "period_names": self.period_names,
            "n": self.n,
            "seeds": self.seeds,
            "runs": [r.run_id for r in self.runs],
            "complete_runs": [r.run_id for r in self.complete],
            "metrics": self.metrics,
            "per_period": self.per_period,
            # a stream's matrix is of each task's primary metric, not EM: it is under "stream"
            "matrix_storage_em_mean": self.matrix_mean if self.kind == "temporal" else None,
            "matrix_storage_em_ci95_half": self.matrix_half if self.kind == "temporal" else None,
            "forgetting_curve": self.forgetting_curve,
            "method_extras": self.extras,
            "lm_eval": self.lm_eval,
            "landscape": self.landscape,
            "retention": self.retention,
            "kind": self.kind,
            "stream": self.stream or None,
        }


def forgetting_curve(matrix: Sequence[Sequence[float | None]]) -> list[float | None]:
    """F(k) for k = 2..T: mean over t < k of max_{l=t..k-1} R[l][t] - R[k][t] (1-based periods).

    F(T) is exactly the run's ``forgetting`` metric; earlier points truncate the sequence at k.
    """
    t_count = len(matrix) - 1
    out: list[float | None] = []
    for k in range(2, t_count + 1):
        terms = []
        for t in range(1, k):
            best = [v for i in range(t, k) if (v := matrix[i][t - 1]) is not None]
            last = matrix[k][t - 1]
            if best and last is not None:
                terms.append(max(best) - last)
        out.append(sum(terms) / len(terms) if terms else None)
    return out


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def _variant_labels(runs_by_key: dict[tuple, list[Run]]) -> dict[tuple, str]:
    """method, or method [key=value ...] naming the config fields that tell variants of a method apart."""
    labels: dict[tuple, str] = {}
    siblings: dict[tuple, list[tuple]] = defaultdict(list)
    for key in runs_by_key:
        siblings[key[:4]].append(key)  # (bench, fingerprint, model, method)
    for family, keys in siblings.items():
        method = family[3]
        if len(keys) == 1:
            labels[keys[0]] = method
            continue
        flats = {}
        for key in keys:
            flats[key] = _flat(variant_tree(runs_by_key[key][0].config or {}))
        all_fields = sorted(set().union(*flats.values()))
        differing = [f for f in all_fields if len({json.dumps(fl.get(f)) for fl in flats.values()}) > 1]
        for key in keys:
            bits = ", ".join(f"{f}={flats[key].get(f)}" for f in differing[:3])
            if len(differing) > 3:
                bits += ", ..."
            labels[key] = f"{method} [{bits or key[4]}]"
    return labels


def _agg_matrix(matrices: list[list[list[float | None]]]) -> tuple[list, list]:
    rows, cols = len(matrices[0]), len(matrices[0][0])
    mean, half = [], []
    for i in range(rows):
        m_row, h_row = [], []
        for j in range(cols):
            a = mean_ci(m[i][j] for m in matrices)
            m_row.append(a["mean"])
            h_row.append(a["half"])
        mean.append(m_row)
        half.append(h_row)
    return mean, half


def _numeric_leaves(tree: Any, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in _flat(tree, prefix).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def lm_eval_scores(result: dict[str, Any] | None) -> dict[str, tuple[float, bool]]:
    """{"task/metric": (value, higher_is_better)} from an lm_eval job's stored results."""
    if not result:
        return {}
    out = {}
    for task, metrics in (result.get("scores") or {}).items():
        for metric, entry in metrics.items():
            value = entry.get("value")
            if isinstance(value, (int, float)) and math.isfinite(value):
                out[f"{task}/{metric}"] = (float(value), bool(entry.get("higher_is_better", True)))
    return out


def _metrics(run: Run) -> dict[str, Any]:
    """A complete run's recomputed metrics (groups aggregate complete runs only)."""
    assert run.metrics is not None, run.run_id
    return run.metrics


def _aggregate_temporal(group: Group, runs: list[Run]) -> None:
    for key in SCALAR_KEYS:
        group.metrics[key] = mean_ci(_metrics(r).get(key) for r in runs)
    for key in PER_PERIOD_KEYS:
        group.per_period[key] = [mean_ci(_metrics(r)[key][k] for r in runs) for k in range(len(group.period_names))]
    # The figures' matrix is the storage one (the extraction matrix stays in each run's results.json).
    group.matrix_mean, group.matrix_half = _agg_matrix([_metrics(r)["matrix_storage_em"] for r in runs])
    curves = [forgetting_curve(_metrics(r)["matrix_storage_em"]) for r in runs]
    group.forgetting_curve = [mean_ci(c[i] for c in curves) for i in range(len(group.period_names) - 1)]


def _aggregate_stream(group: Group, runs: list[Run]) -> None:
    """Seed aggregates of a stream group. The runs share the stream (same fingerprint), so tasks, primary
    metrics and directions are those of the first run."""
    first = _metrics(runs[0])
    tasks = list(first["tasks"])
    t_count = len(tasks)
    for summary, keys in STREAM_SUMMARIES.items():
        for key, _, _ in keys:
            group.metrics[f"{summary}.{key}"] = mean_ci((_metrics(r).get(summary) or {}).get(key) for r in runs)
    group.matrix_mean, group.matrix_half = _agg_matrix([_metrics(r)["matrix"] for r in runs])

    def column(row_of: Any) -> dict[str, dict[str, Any]]:
        return {t: mean_ci(_metrics(r)["matrix"][row_of(j)][j] for r in runs) for j, t in enumerate(tasks)}

    matrices: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for t in tasks:
        matrices[t] = {}
        for metric in first["matrices"][t]:
            aggs = [mean_ci(_metrics(r)["matrices"][t][metric][k] for r in runs) for k in range(t_count + 1)]
            matrices[t][metric] = {"mean": [a["mean"] for a in aggs], "ci95_half": [a["half"] for a in aggs]}
    group.stream = {
        "order": runs[0].stream_order,
        "tasks": tasks,
        "primary_metric": dict(first["primary_metric"]),
        "higher_is_better": dict(first["higher_is_better"]),
        "scorers": {t: first["scorers"][t]["name"] for t in tasks},
        "eval_counts": dict(first["eval_counts"]),
        "matrix_mean": group.matrix_mean,
        "matrix_ci95_half": group.matrix_half,
        # R[0][t] (base model), R[t][t] (right after training on t) and R[T][t] (final), per task
        "base": column(lambda j: 0),
        "just_trained": column(lambda j: j + 1),
        "final": column(lambda j: t_count),
        # in how many of the group's complete runs each higher-is-better task was base-solved
        "base_solved": {
            t: sum(t in (_metrics(r).get("base_solved") or []) for r in runs)
            for t in tasks
            if first["higher_is_better"][t]
        },
        "base_solved_margin": first.get("base_solved_margin"),
        "matrices": matrices,
    }


def _aggregate_group(group: Group) -> None:
    runs = [r for r in group.complete if _metrics(r)]
    if not runs:
        return
    if group.kind == "stream":
        _aggregate_stream(group, runs)
    else:
        _aggregate_temporal(group, runs)
    extras: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        for key, value in _numeric_leaves(r.rows[-1].extras).items():
            extras[key].append(value)
    group.extras = {k: mean_ci(v) for k, v in sorted(extras.items())}

    # lm-eval: change of every task metric relative to the same run's base row.
    keys = sorted({k for r in runs for row in r.rows for k in lm_eval_scores(row.lm_eval)})
    for key in keys:
        values, deltas, direction = [], [], True
        for k in range(len(group.period_names) + 1):
            vs, ds = [], []
            for r in runs:
                scores = lm_eval_scores(r.rows[k].lm_eval)
                base = lm_eval_scores(r.rows[0].lm_eval).get(key)
                if key in scores:
                    vs.append(scores[key][0])
                    direction = scores[key][1]
                    if base is not None:
                        ds.append(scores[key][0] - base[0])
            values.append(mean_ci(vs))
            deltas.append(mean_ci(ds))
        group.lm_eval[key] = {"higher_is_better": direction, "value": values, "delta": deltas}

    _aggregate_retention(group, runs)

    # Loss landscape: per period checkpoint, over the runs that have one.
    if any(row.landscape for r in runs for row in r.rows):
        for key in LANDSCAPE_KEYS:
            per_k: list[dict[str, Any] | None] = []
            for k in range(len(group.period_names) + 1):
                vals = [(r.rows[k].landscape or {}).get("metrics", {}).get(key) for r in runs]
                vals = [v for v in vals if v is not None]
                per_k.append(mean_ci(vals) if vals else None)
            group.landscape[key] = per_k


def _aggregate_retention(group: Group, runs: list[Run]) -> None:
    """Each retention task's primary metric: its base value and its drop after every period (means over the
    group's runs with t intervals), and for one run the item-bootstrap interval of its final drop."""
    tracks: list[Any] = [(r.metrics or {}).get("retention") for r in runs]
    if not tracks or not all(tracks):
        return
    for task, metric in tracks[0]["primary_metric"].items():
        entries = [t["tasks"][task]["metrics"][metric] for t in tracks]
        rows = len(entries[0]["per_row"])
        group.retention[f"{task}/{metric}"] = {
            "higher_is_better": entries[0]["higher_is_better"],
            "base": mean_ci(e["per_row"][0] for e in entries),
            "drop": [mean_ci(e["drop"][k] for e in entries) for k in range(rows)],
            "rel_drop_final": mean_ci(e["rel_drop"][-1] for e in entries),
            "item_ci": entries[0]["drop_ci"][-1] if len(entries) == 1 else None,
        }


def build_groups(runs: Sequence[Run]) -> list[Group]:
    """Group runs by (benchmark, fingerprint, model, method, variant) and aggregate the complete ones."""
    by_key: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        if run.config is None or not run.period_names:
            continue  # failed before we even know what it was
        by_key[(run.bench_key, run.fingerprint, run.model, run.method, run.variant)].append(run)
    fingerprints: dict[str, set[str]] = defaultdict(set)
    for key in by_key:
        fingerprints[key[0]].add(key[1])
    labels = _variant_labels(by_key)
    groups = []
    for key in sorted(by_key):
        bench, fp = key[0], key[1]
        bench_label = bench if len(fingerprints[bench]) == 1 else f"{bench} [data {fp[:8]}]"
        bound = " (bound)" if any(r.is_bound for r in by_key[key]) else ""
        group = Group(
            benchmark=bench_label,
            model=key[2],
            method=key[3],
            variant=key[4],
            label=labels[key] + bound,
            period_names=by_key[key][0].period_names,
            kind=by_key[key][0].kind,
            runs=sorted(by_key[key], key=lambda r: (r.seed is None, r.seed, r.run_id)),
        )
        _aggregate_group(group)
        groups.append(group)
    return groups
