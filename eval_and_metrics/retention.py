"""The retention track: what a run costs the model outside the facts or tasks it is taught.

A continual-learning method can learn every new fact and still damage what the model knew before: the
headline of sparse memory finetuning (Lin et al. 2025) is exactly that loss, measured on held-out
tasks. `eval.retention` names a stream file (or preset, configs/streams/) whose tasks' *eval* items are
scored at the base row and after every period or task, by the tasks' own scorers, with the same model
state the run's own evaluation sees (no method scope: the model as it stands). Their train items are
never used.

From those rows, per task and per metric of its scorer, for every row k against the base row:

    drop_k     = base - value_k     (higher-is-better metrics; value_k - base for lower-is-better)
    rel_drop_k = drop_k / |base|

so a positive drop is ability lost, in both directions of metric. The closing table of main.py shows each
task's relative drop of its primary metric after the last period (R:<task>). Intervals are 95% paired percentile
bootstrap intervals over the task's items (the same resampled items in the base row and in row k,
seeded, so a rerun gives the same interval). For multiple-choice tasks `kept_correct_k` is the share
of the items the base model answered correctly that row k still answers correctly (questions the base
model already knows, issue 19's third kind of retention item).

Every run of one retention preset scores the same items (the stream is loaded with seed 0 whatever the
run's seed), so two methods' drops are paired over items too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.streams import load_stream
from data.streams.schema import Stream
from eval_and_metrics.evaluate import UNBOUNDED, Budget
from eval_and_metrics.scorers import SCORERS, Scorer
from eval_and_metrics.shard import ONE, Shard
from eval_and_metrics.stream_metrics import row_summary, rows_by_task

# Each row's retention items, beside its eval/predictions.jsonl (one JSON object per item).
RETENTION_FILE = "retention.jsonl"
# Retention items are sampled with this stream seed in every run, so every run scores the same items.
RETENTION_SEED = 0
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


class RetentionError(ValueError):
    """A retention file that cannot be scored (unknown scorer, items a scorer refuses)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class RetentionTrack:
    spec: str  # what eval.retention said
    stream: Stream
    scorers: dict[str, Scorer]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.stream.tasks]

    @property
    def fingerprint(self) -> str:
        return self.stream.fingerprint

    def num_items(self) -> int:
        return sum(len(t.eval) for t in self.stream.tasks)

    @torch.no_grad()
    def evaluate(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        batch_size: int,
        max_new_tokens: int,
        should_stop: Callable[[], bool] = lambda: False,
        progress: Callable[[int], None] = lambda n: None,
        shard: Shard = ONE,
        budget: Budget = UNBOUNDED,
    ) -> list[dict[str, Any]]:
        """One row per item, each with its task's name (the stream workload's row format)."""
        rows: list[dict[str, Any]] = []
        for task in self.stream.tasks:
            scored = self.scorers[task.name].score(
                model,
                tokenizer,
                list(task.eval),
                device,
                batch_size,
                max_new_tokens,
                should_stop=should_stop,
                progress=progress,
                shard=shard,
                budget=budget,
            )
            rows.extend({**row, "task": task.name} for row in scored)
        return rows

    def summary(self, rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return row_summary(self.task_names, self.scorers, rows)

    def metrics(self, rows_per_row: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
        return retention_metrics(self.task_names, self.scorers, rows_per_row) | {
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "scorers": {t.name: t.scorer for t in self.stream.tasks},
        }


def load_retention(spec: str) -> RetentionTrack:
    """The retention stream named by eval.retention, every item checked by its scorer (one line each)."""
    stream = load_stream(spec, seed=RETENTION_SEED)
    problems = []
    scorers: dict[str, Scorer] = {}
    for task in stream.tasks:
        if task.scorer not in SCORERS:
            problems.append(
                f"eval.retention {spec}: task {task.name!r}: scorer {task.scorer!r} is not registered; "
                f"valid: {', '.join(SCORERS)}"
            )
            continue
        scorers[task.name] = SCORERS[task.scorer]()
        problems += [
            f"eval.retention {spec}: task {task.name!r}: {p}" for p in scorers[task.name].check(list(task.eval))
        ]
        if not task.eval:
            problems.append(f"eval.retention {spec}: task {task.name!r} has no eval items")
    if problems:
        raise RetentionError(problems)
    return RetentionTrack(spec, stream, scorers)


def _interval(samples: np.ndarray) -> list[float | None]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [None, None]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]


def _num(v: Any) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _drops(base: float, value: float, higher_is_better: bool) -> tuple[float, float]:
    drop = (base - value) if higher_is_better else (value - base)
    return drop, (drop / abs(base) if base else math.nan)


def task_retention(
    scorer: Scorer,
    rows_per_row: Sequence[Sequence[dict[str, Any]]],
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Per metric of `scorer`: its value in every row, the drop and relative drop against row 0 with
    paired bootstrap intervals over items. Every row must hold the same items in the same order."""
    ids = [r["id"] for r in rows_per_row[0]]
    for k, rows in enumerate(rows_per_row):
        if [r["id"] for r in rows] != ids:
            raise ValueError(f"retention row {k} does not score the same items as the base row")
    n = len(ids)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(samples, n))
    out: dict[str, Any] = {"n": n, "metrics": {}}
    # Each resample's aggregate is computed once per row and shared by every metric.
    boot = [[scorer.aggregate([rows[i] for i in pick]) for pick in picks] for rows in rows_per_row]
    for metric, higher_is_better in scorer.metrics.items():
        values = [scorer.aggregate(list(rows))[metric] for rows in rows_per_row]
        base = values[0]
        entry: dict[str, Any] = {
            "higher_is_better": higher_is_better,
            "per_row": [_num(v) for v in values],
            "drop": [],
            "drop_ci": [],
            "rel_drop": [],
            "rel_drop_ci": [],
        }
        base_boot = np.array([b[metric] for b in boot[0]], dtype=float)
        for k, value in enumerate(values):
            drop, rel = _drops(base, value, higher_is_better)
            row_boot = np.array([b[metric] for b in boot[k]], dtype=float)
            d = (base_boot - row_boot) if higher_is_better else (row_boot - base_boot)
            with np.errstate(divide="ignore", invalid="ignore"):
                r = d / np.abs(base_boot)
            entry["drop"].append(_num(drop))
            entry["rel_drop"].append(_num(rel))
            entry["drop_ci"].append(_interval(d) if k else [0.0, 0.0])
            entry["rel_drop_ci"].append(_interval(r) if k else [0.0, 0.0])
        out["metrics"][metric] = entry
    if "acc" in scorer.metrics and all("acc" in r for r in rows_per_row[0]):
        known = [i for i, r in enumerate(rows_per_row[0]) if r["acc"] == 1.0]
        out["base_correct"] = len(known)
        out["kept_correct"] = [
            (sum(rows[i]["acc"] for i in known) / len(known)) if known else None for rows in rows_per_row
        ]
    return out


def retention_metrics(
    task_names: Sequence[str], scorers: Mapping[str, Scorer], rows_per_row: Sequence[Sequence[dict[str, Any]]]
) -> dict[str, Any]:
    """results.json's "retention": every task's retention (task_retention), and the headline per task: the
    drop and relative drop of its primary metric (its scorer's first) after the last row. Tasks are never
    averaged together (an accuracy's drop and a perplexity's drop are different quantities)."""
    per_row = [rows_by_task(task_names, rows) for rows in rows_per_row]
    tasks = {name: task_retention(scorers[name], [rows[name] for rows in per_row]) for name in task_names}
    primary = {name: next(iter(scorers[name].metrics)) for name in task_names}
    return {
        "tasks": tasks,
        "primary_metric": primary,
        "final_drop": {name: tasks[name]["metrics"][primary[name]]["drop"][-1] for name in task_names},
        "final_drop_ci": {name: tasks[name]["metrics"][primary[name]]["drop_ci"][-1] for name in task_names},
        "final_rel_drop": {name: tasks[name]["metrics"][primary[name]]["rel_drop"][-1] for name in task_names},
    }


def summary_columns(track: RetentionTrack | None) -> list[tuple[str, str]]:
    """The closing table's retention columns: each task's relative drop after the last row (dotted keys into
    results.json's metrics, short labels)."""
    if track is None:
        return []
    return [(f"retention.final_rel_drop.{name}", f"R:{name}"[:7]) for name in track.task_names]


def recompute(saved: Mapping[str, Any], rows_per_row: Sequence[Sequence[dict[str, Any]]]) -> dict[str, Any]:
    """results.json's "retention" again, from the committed retention rows and the scorer names it saved (what
    the report does, so a number it shows comes from the committed files)."""
    scorer_names: dict[str, str] = dict(saved["scorers"])
    unknown = [f"{task}: {name}" for task, name in scorer_names.items() if name not in SCORERS]
    if unknown:
        raise ValueError(f"retention scorers not registered: {', '.join(unknown)}")
    scorers = {task: SCORERS[name]() for task, name in scorer_names.items()}
    return retention_metrics(list(scorer_names), scorers, rows_per_row) | {
        key: saved[key] for key in ("spec", "fingerprint", "scorers") if key in saved
    }
