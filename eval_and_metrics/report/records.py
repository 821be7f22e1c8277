"""The report's records and metric keys: what a run and its committed rows are (`Run`, `PeriodRow`),
the run statuses, and which metrics are aggregated, checked and shown. Every other module of the
report imports these; they import nothing of the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPORT_SCHEMA_VERSION = 1
REPORT_KIND = "report"

STATUSES = ("complete", "running", "partial", "corrupted", "failed")
CONFIDENCE = 0.95
# Run-level metrics aggregated per group: every scalar of derive_metrics (summary ones first). Every
# temporal key names its probe family (storage / extraction); the two are never averaged together.
FAMILIES = ("storage", "extraction")
SUBSET_METRICS = ("plasticity", "stability", "temporal_recall")
SUMMARY_KEYS = [
    "acc_storage",
    "bwt_storage",
    "fwt_storage",
    "forgetting_storage",
    "plasticity_storage_pooled",
    "plasticity_extraction_pooled",
    "stability_storage_pooled",
    "stability_extraction_pooled",
    "temporal_recall_storage_final",
    "temporal_recall_extraction_final",
    "outdated_storage_pooled",
    "outdated_extraction_pooled",
    "acc_extraction",
]
SUMMARY_LABELS = {
    "acc_storage": "final ACC storage",
    "bwt_storage": "BWT storage",
    "fwt_storage": "FWT storage",
    "forgetting_storage": "forgetting storage",
    "plasticity_storage_pooled": "plasticity storage",
    "plasticity_extraction_pooled": "plasticity extraction",
    "stability_storage_pooled": "stability storage",
    "stability_extraction_pooled": "stability extraction",
    "temporal_recall_storage_final": "temporal recall storage",
    "temporal_recall_extraction_final": "temporal recall extraction",
    "outdated_storage_pooled": "outdated answers storage",
    "outdated_extraction_pooled": "outdated answers extraction",
    "acc_extraction": "final ACC extraction",
}
# DyKnow's wrong answers (metrics.answer_kind_rates): stale answers to new facts, present answers to the past
ANSWER_VIEWS = ("outdated", "overwritten")
LOWER_IS_BETTER = {f"forgetting_{fam}{s}" for fam in FAMILIES for s in ("", "_f1")}
LOWER_IS_BETTER |= {f"{view}_{fam}_{stat}" for view in ANSWER_VIEWS for fam in FAMILIES for stat in ("pooled", "mean")}
_ALL_SCALARS = [f"{m}_{fam}{s}" for fam in FAMILIES for m in ("acc", "bwt", "fwt", "forgetting") for s in ("", "_f1")]
_ALL_SCALARS += [
    f"{name}_{fam}_{stat}"
    for fam in FAMILIES
    for name in SUBSET_METRICS
    for stat in ("pooled", "pooled_f1", "n", "mean", "mean_f1")
]
_ALL_SCALARS += [f"temporal_recall_{fam}_{stat}" for fam in FAMILIES for stat in ("final", "final_f1")]
_ALL_SCALARS += [
    f"{view}_{fam}_{stat}" for fam in FAMILIES for view in ANSWER_VIEWS for stat in ("pooled", "mean", "n")
]
SCALAR_KEYS = SUMMARY_KEYS + [k for k in _ALL_SCALARS if k not in SUMMARY_KEYS]
PER_PERIOD_KEYS = [f"{name}_{fam}" for fam in FAMILIES for name in (*SUBSET_METRICS, *ANSWER_VIEWS)]
LANDSCAPE_KEYS = [
    "center_loss",
    "max_loss",
    "min_loss",
    "std_loss",
    "loss_range",
    "max_curvature",
    "fisher_top_eigenvalue",
    "delta_w_norm",
    "forgetting_estimate",
]
# Task streams: the scalars of each summary of stream_metrics, in table order, as (key, label, higher is
# better). The two summaries are never averaged together (docs/metrics.md section 10).
STREAM_HIGHER_KEYS: list[tuple[str, str, bool]] = [
    ("acc", "ACC (macro)", True),
    ("acc_micro", "ACC micro", True),
    ("avg_acc_over_time", "avg ACC over time", True),
    ("bwt", "BWT", True),
    ("fwt", "FWT", True),
    ("forgetting", "forgetting", False),
    ("max_drop", "max drop", False),
    ("fg_pct", "FG%", False),
    ("plasticity", "plasticity", True),
]
# Every lower-is-better scalar is better when lower: final loss, a rise after training (BWT > 0 and
# forgetting > 0 are forgetting), and learning < 0 (training lowered the task's loss).
STREAM_LOWER_KEYS: list[tuple[str, str, bool]] = [
    ("final", "final", False),
    ("bwt", "BWT", False),
    ("forgetting", "forgetting", False),
    ("learning", "learning", False),
]
STREAM_SUMMARIES = {"higher_is_better_summary": STREAM_HIGHER_KEYS, "lower_is_better_summary": STREAM_LOWER_KEYS}
# What results.json's metrics must agree on with the re-derivation ("matrices" follow from the same rows).
STREAM_CHECKED_KEYS = [
    "tasks",
    "primary_metric",
    "higher_is_better",
    "eval_counts",
    "matrix",
    "higher_is_better_summary",
    "lower_is_better_summary",
    "base_solved",
]
BASE_SOLVED_MARK = "†"


# ------------------------------------------------------------------------------------------
# records


@dataclass
class PeriodRow:
    """One committed, verified row of a run (k = 0 is the base model)."""

    index: int
    name: str
    scores: dict[str, Any]  # eval/scores.json "by_period": {"<t>/storage": {em, f1, n}, "<t>/extraction": ...}
    extras: dict[str, Any]
    train: dict[str, Any]
    trainable_sha256: str | None
    em: dict[str, float] = field(default_factory=dict, repr=False)  # per probe id, from eval/predictions.jsonl
    f1: dict[str, float] = field(default_factory=dict, repr=False)
    logprob: dict[str, float] = field(default_factory=dict, repr=False)
    prediction: dict[str, str] = field(default_factory=dict, repr=False)
    retention: list[dict[str, Any]] | None = field(default=None, repr=False)  # eval/retention.jsonl, if any
    # streams: {task: {metric: value, "n": items}}, re-aggregated from eval/predictions.jsonl by the scorers
    task_scores: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    landscape: dict[str, Any] | None = None
    lm_eval: dict[str, Any] | None = None


@dataclass
class Run:
    run_id: str
    path: Path
    status: str = "failed"
    reason: str = ""
    config: dict[str, Any] | None = None
    method: str = "?"
    seed: int | None = None
    mode: str = "?"
    benchmark: str = "?"
    fingerprint: str = ""
    model: str = "?"
    variant: str = ""
    period_names: list[str] = field(default_factory=list)
    rows: list[PeriodRow] = field(default_factory=list)
    metrics: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    kind: str = "temporal"  # or "stream" (data/stream.json)
    stream_order: int | None = None
    is_bound: bool = False  # the joint / per-task bounds: a reference row, labelled, never a method to rank
    # CASMO's per-step (period, step, confidence, calibrating) from train_log.jsonl; [] for other optimizers
    confidence_trace: list[tuple[int, int, float, bool]] = field(default_factory=list)

    @property
    def unit(self) -> str:
        """What the run's stages are called in reasons."""
        return "tasks" if self.kind == "stream" else "periods"

    @property
    def bench_key(self) -> str:
        """What runs are grouped by: the benchmark name, or for a stream its name and order (two orders of
        one stream are two experiments, and the kind keeps a stream apart from a temporal benchmark)."""
        if self.kind == "stream":
            return f"{self.benchmark} (stream, order {self.stream_order})"
        return self.benchmark

    @property
    def num_periods(self) -> int:
        return len(self.period_names)

    @property
    def num_committed(self) -> int:
        """Periods committed after the base row."""
        return max(0, len(self.rows) - 1)

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "path": str(self.path),
            "status": self.status,
            "reason": self.reason,
            "method": self.method,
            "seed": self.seed,
            "mode": self.mode,
            "benchmark": self.benchmark,
            "data_fingerprint": self.fingerprint,
            "model": self.model,
            "variant": self.variant,
            "periods": self.period_names,
            "committed_periods": self.num_committed,
            "warnings": self.warnings,
            "kind": self.kind,
            "stream_order": self.stream_order,
        }
