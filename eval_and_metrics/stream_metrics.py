"""Continual-learning metrics of a task stream, from its score matrices (formulas: docs/metrics.md,
"Task streams").

R[i][j] is task j's primary metric after training through task i; row 0 is the base model, so R has
T + 1 rows and T columns. Tasks whose primary metric is higher-is-better (accuracy, pass@1, EM, ROUGE-L)
and lower-is-better (perplexity, NLL) are summarised apart and never averaged together: a mean of an
accuracy and a perplexity means nothing. Every convention the literature uses under one name is
computed under its own name here, so a number can be compared with a paper without guessing.

The path from committed eval rows to those metrics (rows -> per-task aggregates -> R -> metrics) lives
here too, so the training loop (training/workload.py) and the report (eval_and_metrics/report/),
which re-derives a run from its committed predictions, compute it with the same code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

# A task whose base-model score is within this of its score right after training on it showed no
# measurable learning: a later change of its score is drift, not forgetting of something learnt.
BASE_SOLVED_MARGIN = 0.02


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _mean(values: Sequence[float | None]) -> float | None:
    vals = _finite(values)
    return float(np.mean(vals)) if vals else None


def higher_better_metrics(r: np.ndarray, cols: list[int], counts: list[int]) -> dict[str, Any]:
    """Metrics over the higher-is-better columns `cols` of R ((T+1) x T); counts: eval items per task."""
    t = r.shape[1]
    if not cols:
        return {}
    final = [r[t][j] for j in cols]
    earlier = [j for j in cols if j < t - 1]  # every task but the last can be forgotten
    gains = {j: r[j + 1][j] - r[0][j] for j in cols}
    out: dict[str, Any] = {
        # ACC: final row, macro (each task counts once) and micro (each eval item counts once)
        "acc": _mean(final),
        "acc_micro": (
            float(sum(r[t][j] * counts[j] for j in cols) / sum(counts[j] for j in cols))
            if sum(counts[j] for j in cols)
            else None
        ),
        # average accuracy over time: after each task i, the mean over the tasks seen so far
        "avg_acc_over_time": _mean(
            [_mean([r[i][j] for j in cols if j < i]) for i in range(1, t + 1) if any(j < i for j in cols)]
        ),
        # BWT (Lopez-Paz & Ranzato 2017): final minus just-after-training, tasks 1..T-1
        "bwt": _mean([r[t][j] - r[j + 1][j] for j in earlier]),
        # FWT: zero-shot score just before training on the task, against the base model
        "fwt": _mean([r[j][j] - r[0][j] for j in cols if j >= 1]),
        # forgetting, ours: the best score the task had after it was trained minus the final one
        "forgetting": _mean([max(r[i][j] for i in range(j + 1, t)) - r[t][j] for j in earlier]),
        # Chaudhry et al. 2018 exactly: the max over every trained model before the last (rows 1..T-1),
        # also those from before the task was trained, where a task the base already solves scores high
        "forgetting_chaudhry": _mean([max(r[i][j] for i in range(1, t)) - r[t][j] for j in earlier]),
        # maximum drop (CASMO B7): the worst fall of any task below its just-trained score, at any later row
        "max_drop": (
            max(max(r[j + 1][j] - r[i][j] for i in range(j + 1, t + 1)) for j in earlier) if earlier else None
        ),
        # relative forgetting FG% against the base: share of a task's gain over the base that is lost by the end
        "fg_pct": _mean([100 * (r[j + 1][j] - r[t][j]) / gains[j] for j in earlier if gains[j] > 0]),
        # plasticity: what training on a task adds over the score just before it
        "plasticity": _mean([r[j + 1][j] - r[j][j] for j in cols]),
        "num_tasks": len(cols),
    }
    return out


def lower_better_metrics(r: np.ndarray, cols: list[int]) -> dict[str, Any]:
    """The same ideas for lower-is-better columns (NLL per token): a rise is forgetting, so signs flip
    where that keeps "positive = forgetting" and "negative = learning"."""
    t = r.shape[1]
    if not cols:
        return {}
    earlier = [j for j in cols if j < t - 1]
    return {
        "final": _mean([r[t][j] for j in cols]),
        "bwt": _mean([r[t][j] - r[j + 1][j] for j in earlier]),  # > 0: the loss rose again (forgetting)
        "forgetting": _mean([r[t][j] - min(r[i][j] for i in range(j + 1, t)) for j in earlier]),
        "forgetting_chaudhry": _mean([r[t][j] - min(r[i][j] for i in range(1, t)) for j in earlier]),
        "learning": _mean([r[j + 1][j] - r[j][j] for j in cols]),  # < 0: training on the task lowered its loss
        "num_tasks": len(cols),
    }


def stream_metrics(
    task_names: list[str], primary: list[str], higher_is_better: list[bool], r: np.ndarray, counts: list[int]
) -> dict[str, Any]:
    """Everything results.json carries for a stream, from the primary-metric matrix R."""
    t = len(task_names)
    if r.shape != (t + 1, t):
        raise ValueError(f"score matrix must be {(t + 1, t)} (base row + one per task), got {r.shape}")
    hi = [j for j in range(t) if higher_is_better[j]]
    lo = [j for j in range(t) if not higher_is_better[j]]
    base_solved = [task_names[j] for j in hi if r[0][j] >= r[j + 1][j] - BASE_SOLVED_MARGIN]
    return {
        "tasks": task_names,
        "primary_metric": dict(zip(task_names, primary)),
        "higher_is_better": dict(zip(task_names, higher_is_better)),
        "matrix": [[None if not math.isfinite(v) else float(v) for v in row] for row in r],
        "eval_counts": dict(zip(task_names, counts)),
        "higher_is_better_summary": higher_better_metrics(r, hi, counts),
        "lower_is_better_summary": lower_better_metrics(r, lo),
        "base_solved": base_solved,
        "base_solved_margin": BASE_SOLVED_MARGIN,
    }


class Aggregator(Protocol):
    """What the derivation needs of a scorer (eval_and_metrics.scorers.Scorer): its metrics, in order
    (the first is the primary one), each with its direction, and how its rows become those metrics."""

    @property
    def metrics(self) -> Mapping[str, bool]: ...

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]: ...


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def rows_by_task(task_names: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """One row list per task, in task order; a row of a task the stream does not have is an error (it
    would otherwise vanish from every number)."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in task_names}
    for row in rows:
        task = row.get("task")
        if task not in out:
            raise ValueError(f"eval row {row.get('id')!r} belongs to task {task!r}, which the stream does not have")
        out[task].append(row)
    return out


def row_summary(
    task_names: Sequence[str], scorers: Mapping[str, Aggregator], rows: Sequence[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """One model state's numbers: {task: {every metric of its scorer, "n": eval rows}} (what a period's
    eval/scores.json "by_period" and its manifest carry)."""
    return {
        name: {**scorers[name].aggregate(sel), "n": len(sel)} for name, sel in rows_by_task(task_names, rows).items()
    }


def derive_from_summaries(
    task_names: Sequence[str],
    scorer_names: Sequence[str],
    scorers: Mapping[str, Aggregator],
    counts: Sequence[int],
    summaries: Sequence[Mapping[str, Mapping[str, Any]]],
) -> dict[str, Any]:
    """results.json's "metrics" of a stream from the row summaries (row 0 = base model, then one per
    task): stream_metrics on the primary-metric matrix, plus every metric of every scorer as a column
    over the rows (`matrices`) and which scorer scored each task (`scorers`).

    counts: eval items per task (for the micro ACC).
    """
    names = list(task_names)
    primary = [next(iter(scorers[t].metrics)) for t in names]
    hib = [scorers[t].metrics[m] for t, m in zip(names, primary)]
    r = np.array([[float(s[t][m]) for t, m in zip(names, primary)] for s in summaries], dtype=float)
    out = stream_metrics(names, primary, hib, r, list(counts))
    # every metric of every scorer, per task: column over the rows (base first)
    out["matrices"] = {t: {m: [_num(s[t].get(m)) for s in summaries] for m in scorers[t].metrics} for t in names}
    out["scorers"] = {t: {"name": sn, "metrics": dict(scorers[t].metrics)} for t, sn in zip(names, scorer_names)}
    return out


def derive_stream_metrics(
    task_names: Sequence[str],
    scorer_names: Sequence[str],
    scorers: Mapping[str, Aggregator],
    counts: Sequence[int],
    rows_per_row: Sequence[Sequence[dict[str, Any]]],
) -> dict[str, Any]:
    """derive_from_summaries from the eval rows of every model state (base first)."""
    summaries = [row_summary(task_names, scorers, rows) for rows in rows_per_row]
    return derive_from_summaries(task_names, scorer_names, scorers, counts, summaries)
