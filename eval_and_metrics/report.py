"""Gather every run under a run root into tables, plots and one self-contained HTML page.

    uv run python -m eval_and_metrics.report RUN_ROOT [--out DIR]

What counts (docs/reports.md has the full description):

* Only committed periods: ``periods/<k>-<name>/`` whose manifest verifies (every file's size and
  sha256). ``.tmp-`` entries are in-flight writes and are never looked at, so the report is safe to
  run while jobs are still training. A run's periods count as a prefix 0..k; the first period dir
  that fails verification makes the run *corrupted* (with the reason); a dir that disappears while
  it is being read (re-committed by its writer) simply does not count.
* Run status: complete (all T+1 rows), running (k of T, a live process holds the run lock),
  partial (k of T, nobody holds the lock: killed, preempted or crashed), corrupted (a committed
  file fails its checksum or the manifests disagree), failed (unreadable: no config, no benchmark,
  predictions that do not cover the probes, ...). Reading a run never raises: any error becomes
  a *failed* status with the reason.
* Metrics of a complete run are recomputed from its committed ``eval/predictions.jsonl`` with
  ``eval_and_metrics.metrics.derive_metrics``; ``results.json`` (written outside any manifest) is
  only cross-checked, and a disagreement is listed as a warning.
* Task streams (``data/stream.json`` instead of ``data/benchmark.json``; rows ``0-base``,
  ``<k>-<task>``): each row's predictions are re-aggregated per task with the task's scorer
  (``SCORERS[name]().aggregate``) and the metrics re-derived with
  ``eval_and_metrics.stream_metrics`` (the code the training loop uses), then cross-checked the same
  way. A stream gets its own tables: the higher-is-better summary, the lower-is-better summary
  (never averaged together) and the final score per task, with base-solved tasks marked.
* Groups: benchmark x model x method (x config variant, when runs of one method differ in more
  than the seed). Seeds are aggregated over complete runs as mean and 95% t-interval:
  mean ± t_{0.975, n-1} * sd / sqrt(n), sd with ddof=1; n is shown, n = 1 has no interval.

Outputs, written into a staging dir and committed with one rename: summary.md, results.csv (tidy:
one row per run x period x metric), results.json, plots/*.png, report.html (plots embedded as
base64 PNG, no external resources) and a manifest.json marking the directory as a report.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import html
import io
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from artifacts import (
    MANIFEST_NAME,
    TMP_PREFIX,
    commit_dir,
    live_holder,
    read_manifest,
    staging_dir,
    utc_now_iso,
    verify_manifest,
    write_manifest,
)
from data.io import BENCHMARK_FILE, read_benchmark
from data.schema import Benchmark
from data.streams.schema import STREAM_FILE, Stream
from eval_and_metrics.metrics import derive_metrics, score_matrix
from eval_and_metrics.retention import RETENTION_FILE
from eval_and_metrics.retention import recompute as recompute_retention
from eval_and_metrics.stream_metrics import derive_from_summaries, row_summary

REPORT_SCHEMA_VERSION = 1
REPORT_KIND = "report"
# Eval jobs store their results beside a period's eval, each dir with its own manifest.
LANDSCAPE_DIR = "landscape"
LANDSCAPE_FILE = "landscape.json"
LM_EVAL_DIR = "lm_eval"
LM_EVAL_FILE = "results.json"

STATUSES = ("complete", "running", "partial", "corrupted", "failed")
CONFIDENCE = 0.95
# Run-level metrics aggregated per group: every scalar of derive_metrics (summary ones first). Every
# temporal key names its probe family (storage / extraction); the two are never averaged together.
FAMILIES = ("storage", "extraction")
SUBSET_METRICS = ("plasticity", "stability", "temporal_recall")
SUMMARY_KEYS = ["acc_storage", "bwt_storage", "fwt_storage", "forgetting_storage",
                "plasticity_storage_pooled", "plasticity_extraction_pooled",
                "stability_storage_pooled", "stability_extraction_pooled",
                "temporal_recall_storage_final", "temporal_recall_extraction_final",
                "outdated_storage_pooled", "outdated_extraction_pooled", "acc_extraction"]
SUMMARY_LABELS = {"acc_storage": "final ACC storage", "bwt_storage": "BWT storage", "fwt_storage": "FWT storage",
                  "forgetting_storage": "forgetting storage",
                  "plasticity_storage_pooled": "plasticity storage", "plasticity_extraction_pooled": "plasticity extraction",
                  "stability_storage_pooled": "stability storage", "stability_extraction_pooled": "stability extraction",
                  "temporal_recall_storage_final": "temporal recall storage",
                  "temporal_recall_extraction_final": "temporal recall extraction",
                  "outdated_storage_pooled": "outdated answers storage",
                  "outdated_extraction_pooled": "outdated answers extraction",
                  "acc_extraction": "final ACC extraction"}
# DyKnow's wrong answers (metrics.answer_kind_rates): stale answers to new facts, present answers to the past
ANSWER_VIEWS = ("outdated", "overwritten")
LOWER_IS_BETTER = {f"forgetting_{fam}{s}" for fam in FAMILIES for s in ("", "_f1")}
LOWER_IS_BETTER |= {f"{view}_{fam}_{stat}" for view in ANSWER_VIEWS for fam in FAMILIES for stat in ("pooled", "mean")}
_ALL_SCALARS = [f"{m}_{fam}{s}" for fam in FAMILIES for m in ("acc", "bwt", "fwt", "forgetting") for s in ("", "_f1")]
_ALL_SCALARS += [f"{name}_{fam}_{stat}" for fam in FAMILIES for name in SUBSET_METRICS
                 for stat in ("pooled", "pooled_f1", "n", "mean", "mean_f1")]
_ALL_SCALARS += [f"temporal_recall_{fam}_{stat}" for fam in FAMILIES for stat in ("final", "final_f1")]
_ALL_SCALARS += [f"{view}_{fam}_{stat}" for fam in FAMILIES for view in ANSWER_VIEWS for stat in ("pooled", "mean", "n")]
SCALAR_KEYS = SUMMARY_KEYS + [k for k in _ALL_SCALARS if k not in SUMMARY_KEYS]
PER_PERIOD_KEYS = [f"{name}_{fam}" for fam in FAMILIES for name in (*SUBSET_METRICS, *ANSWER_VIEWS)]
LANDSCAPE_KEYS = ["center_loss", "max_loss", "min_loss", "std_loss", "loss_range", "max_curvature",
                  "fisher_top_eigenvalue", "delta_w_norm", "forgetting_estimate"]
# Task streams: the scalars of each summary of stream_metrics, in table order, as (key, label, higher is
# better). The two summaries are never averaged together (docs/metrics.md section 10).
STREAM_HIGHER_KEYS: list[tuple[str, str, bool]] = [
    ("acc", "ACC (macro)", True), ("acc_micro", "ACC micro", True), ("avg_acc_over_time", "avg ACC over time", True),
    ("bwt", "BWT", True), ("fwt", "FWT", True), ("forgetting", "forgetting", False), ("max_drop", "max drop", False),
    ("fg_pct", "FG%", False), ("plasticity", "plasticity", True)]
# Every lower-is-better scalar is better when lower: final loss, a rise after training (BWT > 0 and
# forgetting > 0 are forgetting), and learning < 0 (training lowered the task's loss).
STREAM_LOWER_KEYS: list[tuple[str, str, bool]] = [
    ("final", "final", False), ("bwt", "BWT", False), ("forgetting", "forgetting", False),
    ("learning", "learning", False)]
STREAM_SUMMARIES = {"higher_is_better_summary": STREAM_HIGHER_KEYS, "lower_is_better_summary": STREAM_LOWER_KEYS}
# What results.json's metrics must agree on with the re-derivation ("matrices" follow from the same rows).
STREAM_CHECKED_KEYS = ["tasks", "primary_metric", "higher_is_better", "eval_counts", "matrix",
                       "higher_is_better_summary", "lower_is_better_summary", "base_solved"]
BASE_SOLVED_MARK = "†"
# Config keys that never change results (same rule as RunConfig.identity_dict) plus the seed.
_NOT_VARIANT = [("seed",), ("run_root",), ("run_id",), ("train", "progress"), ("train", "step_sleep"),
                ("checkpoint",)]


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
        return {"run_id": self.run_id, "path": str(self.path), "status": self.status, "reason": self.reason,
                "method": self.method, "seed": self.seed, "mode": self.mode, "benchmark": self.benchmark,
                "data_fingerprint": self.fingerprint, "model": self.model, "variant": self.variant,
                "periods": self.period_names, "committed_periods": self.num_committed, "warnings": self.warnings,
                "kind": self.kind, "stream_order": self.stream_order}


# ------------------------------------------------------------------------------------------
# reading one run


def _scorer_registry() -> dict[str, Any]:
    """eval_and_metrics.scorers.SCORERS, imported on first use: the scorers import torch (seconds), which
    a report of temporal runs never needs."""
    from eval_and_metrics.scorers import SCORERS

    return SCORERS


@dataclass(frozen=True)
class StreamData:
    """A run's data/stream.json with what re-deriving its metrics needs: a scorer per task and the ids of
    every task's eval items (each row must score exactly those)."""

    stream: Stream
    scorers: dict[str, Any]  # task name -> scorer instance (only `metrics` and `aggregate` are used)
    eval_ids: dict[str, frozenset[str]]

    @property
    def task_names(self) -> list[str]:
        return self.stream.task_names

    @classmethod
    def from_stream(cls, stream: Stream) -> StreamData:
        registry = _scorer_registry()
        unknown = [f"task {t.name!r}: scorer {t.scorer!r} is not registered" for t in stream.tasks
                   if t.scorer not in registry]
        if unknown:
            raise ValueError(f"data/{STREAM_FILE}: " + "; ".join(unknown) + f" (valid: {', '.join(registry)})")
        return cls(stream=stream, scorers={t.name: registry[t.scorer]() for t in stream.tasks},
                   eval_ids={t.name: frozenset(x.id for x in t.eval) for t in stream.tasks})

    def summarise(self, preds: list[dict[str, Any]], where: str) -> dict[str, dict[str, Any]]:
        """One row's {task: metrics} re-aggregated from its predictions, after checking that they score
        every eval item of every task exactly once (a row that scored other items than another row is
        not comparable with it: the same trap as probes missing from a temporal row)."""
        seen: dict[str, set[str]] = {t: set() for t in self.task_names}
        for row in preds:
            task, item = row.get("task"), row.get("id")
            if task not in seen:
                raise ValueError(f"{where}: row {item!r} is of task {task!r}, which data/{STREAM_FILE} does not have")
            if item not in self.eval_ids[task]:
                raise ValueError(f"{where}: task {task!r}: row {item!r} is not one of its eval items")
            if item in seen[task]:
                raise ValueError(f"{where}: task {task!r}: eval item {item!r} is scored twice")
            seen[task].add(item)
        for task in self.task_names:
            missing = sorted(self.eval_ids[task] - seen[task])
            if missing:
                raise ValueError(f"{where}: task {task!r}: {len(missing)} eval item(s) without a prediction, "
                                 f"first {missing[0]!r}")
        return row_summary(self.task_names, self.scorers, preds)


class _BenchmarkCache:
    """read_benchmark is strict (it recomputes the fingerprint); a sweep shares one file content."""

    def __init__(self) -> None:
        self._by_digest: dict[str, Benchmark] = {}
        self._streams: dict[str, StreamData] = {}

    def load(self, directory: Path) -> Benchmark:
        raw = (directory / BENCHMARK_FILE).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest not in self._by_digest:
            self._by_digest[digest] = read_benchmark(directory)
        return self._by_digest[digest]

    def load_stream(self, directory: Path) -> StreamData:
        """data/stream.json as a Stream (strict: unknown or missing keys raise); its fingerprint is
        recomputed from the content, so the manifests' data_fingerprint check means something."""
        raw = _read_text(directory / STREAM_FILE)
        digest = hashlib.sha256(raw.encode()).hexdigest()
        if digest not in self._streams:
            self._streams[digest] = StreamData.from_stream(Stream.from_json(json.loads(raw)))
        return self._streams[digest]


def _dir_token(directory: Path) -> tuple[int, int] | None:
    try:
        return directory.stat().st_ino, (directory / MANIFEST_NAME).stat().st_mtime_ns
    except OSError:
        return None


def verify_stable(directory: Path, attempts: int = 3) -> tuple[bool | None, str]:
    """verify_manifest that tells a damaged dir from one replaced while we read it.

    (True, "ok"), (False, reason) for a dir that fails twice in the same state, or (None, reason)
    when the dir vanished (a writer is re-committing it): such a dir is simply not counted.
    """
    reason = "not checked"
    for _ in range(attempts):
        before = _dir_token(directory)
        if before is None:
            return None, "vanished while reading"
        ok, reason = verify_manifest(directory)
        if ok:
            return True, reason
        after = _dir_token(directory)
        if after is None:
            return None, "vanished while reading"
        if after == before:
            return False, reason
        time.sleep(0.1)
    return False, reason


def _read_text(path: Path) -> str:
    """A file's text, never through a symbolic link: run dirs on shared scratch may hold planted links,
    and the report must not copy a file from outside a run into its pages (ELOOP -> OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read().decode("utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(_read_text(path))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _read_text(path).splitlines() if line.strip()]


def _drop(tree: dict[str, Any], keys: tuple[str, ...]) -> None:
    node: Any = tree
    for key in keys[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):
        node.pop(keys[-1], None)


def variant_of(config: dict[str, Any]) -> str:
    """Hash of the config minus seed and fields that never change results: runs that are seeds of one setup."""
    tree = json.loads(json.dumps(config, default=str))
    for keys in _NOT_VARIANT:
        _drop(tree, keys)
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:8]


def model_label(config: dict[str, Any]) -> str:
    model = config.get("model") or {}
    if config.get("mode") == "synthetic":
        return f"synthetic-llama(h{model.get('synthetic_hidden_size')},l{model.get('synthetic_layers')})"
    name = model.get("name") or "SmolLM2-135M-Instruct (embedded)"
    if model.get("quantize") not in (None, "none"):
        name += f" [{model['quantize']}]"
    return name


def _last_event(run_dir: Path, stage_names: Sequence[str] | None = None) -> str:
    """A short description of the newest train_log record (cheap: reads the last 4 KiB).

    stage_names: a stream's task names; its log records carry the task's index as "period", which is
    shown as "task k (name)"."""
    path = run_dir / "train_log.jsonl"
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            lines = fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            k = rec.get("period", "?")
            if stage_names is None:
                bits = [str(rec.get("event", "?")), f"period {k}"]
            else:
                name = (["base"] + list(stage_names))[k] if isinstance(k, int) and 0 <= k <= len(stage_names) else "?"
                bits = [str(rec.get("event", "?")), f"task {k} ({name})"]
            if "step" in rec:
                bits.append(f"step {rec['step']}")
            return "last log event: " + " ".join(bits)
    return ""


def _step_checkpoints(run_dir: Path) -> str:
    root = run_dir / "checkpoints"
    found = []
    try:
        for period in sorted(os.listdir(root)):
            if period.startswith(TMP_PREFIX):
                continue
            steps = sorted(s for s in os.listdir(root / period) if s.startswith("step-"))
            if steps:
                found.append(f"{period}/{steps[-1]}")
    except OSError:
        return ""
    return ("step checkpoint " + ", ".join(found)) if found else ""


def _read_subresult(row_dir: Path, sub: str, filename: str, run: Run, label: str) -> dict[str, Any] | None:
    directory = row_dir / sub
    if not directory.is_dir():
        return None
    ok, reason = verify_stable(directory)
    if ok is None:
        return None
    if not ok:
        run.warnings.append(f"{row_dir.name}/{sub} ignored ({label}): {reason}")
        return None
    try:
        return _read_json(directory / filename)
    except (OSError, ValueError) as exc:
        run.warnings.append(f"{row_dir.name}/{sub} ignored ({label}): {exc}")
        return None


def _read_row(directory: Path, k: int, name: str, run: Run, attempts: int = 3,
              stream: StreamData | None = None) -> tuple[PeriodRow, dict[str, Any]] | str | None:
    """Verify one period dir and read it, all within one unchanged state of the dir.

    For a stream run (`stream` given) the row's predictions are checked against the stream's eval
    items and re-aggregated per task; a row that does not score exactly those items raises ValueError
    (the run is then listed as failed, like a temporal row missing a probe).

    Returns (row, manifest), a reason string when the dir is damaged, or None when it vanished or
    kept being replaced while we read (a writer re-committing it): such a row does not count.
    """
    for _ in range(attempts):
        ok, reason = verify_stable(directory)
        if ok is None:
            return None
        if not ok:
            return reason
        token = _dir_token(directory)
        try:
            manifest = read_manifest(directory) or {}
            scores = _read_json(directory / "eval" / "scores.json")
            preds = _read_jsonl(directory / "eval" / "predictions.jsonl")
        except (OSError, ValueError):
            if _dir_token(directory) == token:
                raise
            continue
        if _dir_token(directory) != token:
            continue
        common = {"index": k, "name": name, "scores": scores.get("by_period") or {},
                  "extras": scores.get("extras") or {}, "train": manifest.get("train") or {},
                  "trainable_sha256": manifest.get("trainable_sha256")}
        if stream is None:
            row = PeriodRow(**common, em={r["id"]: r["em"] for r in preds}, f1={r["id"]: r["f1"] for r in preds},
                            logprob={r["id"]: r["logprob"] for r in preds},
                            prediction={r["id"]: r["prediction"] for r in preds})
        else:
            where = f"periods/{directory.name}/eval/predictions.jsonl"
            row = PeriodRow(**common, task_scores=stream.summarise(preds, where))
            # scores.json is in the manifest, so it can only disagree if whatever wrote it aggregated differently
            diffs = _differences(row.task_scores, row.scores, "")
            if diffs:
                run.warnings.append(f"periods/{directory.name}/eval/scores.json disagrees with its re-aggregated "
                                    "predictions (used the latter): " + "; ".join(d.lstrip(".") for d in diffs[:4]))
        if (directory / "eval" / RETENTION_FILE).is_file():  # in the manifest: verified above
            row.retention = _read_jsonl(directory / "eval" / RETENTION_FILE)
        row.landscape = _read_subresult(directory, LANDSCAPE_DIR, LANDSCAPE_FILE, run, "loss landscape")
        row.lm_eval = _read_subresult(directory, LM_EVAL_DIR, LM_EVAL_FILE, run, "lm-eval")
        return row, manifest
    return None


def _recompute_metrics(run: Run, bench: Benchmark) -> dict[str, Any]:
    probes = bench.all_probes()
    metrics = derive_metrics([r.em for r in run.rows], [r.f1 for r in run.rows], probes, bench.period_names,
                             [r.prediction for r in run.rows])
    for family in FAMILIES:
        logprob = score_matrix([r.logprob for r in run.rows], probes, bench.period_names,
                               select=lambda p, family=family: p.family == family)
        metrics[f"matrix_{family}_logprob"] = [[None if math.isnan(v) else float(v) for v in row] for row in logprob]
    return metrics


def _recompute_stream_metrics(run: Run, stream: StreamData) -> dict[str, Any]:
    tasks = stream.stream.tasks
    return derive_from_summaries([t.name for t in tasks], [t.scorer for t in tasks], stream.scorers,
                                 [len(t.eval) for t in tasks], [r.task_scores for r in run.rows])


def _recompute_retention(run: Run) -> None:
    """The retention track's metrics from the committed rows, with the scorers results.json names."""
    if run.metrics is None or not all(r.retention is not None for r in run.rows):
        return
    try:
        saved = (_read_json(run.path / "results.json").get("metrics") or {}).get("retention")
        if saved:
            run.metrics["retention"] = recompute_retention(saved, [r.retention or [] for r in run.rows])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        run.warnings.append(f"retention track not recomputed ({type(exc).__name__}: {exc})")


def _differences(ours: Any, theirs: Any, path: str) -> list[str]:
    """Where two JSON trees differ ("path theirs vs ours"); numbers are equal within 1e-9 (relative
    above 1: perplexities are large)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out: list[str] = []
        for key in sorted(set(ours) | set(theirs), key=str):
            out += _differences(ours.get(key), theirs.get(key), f"{path}.{key}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        out = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            out += _differences(a, b, f"{path}[{i}]")
        return out
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ours, theirs))
    if numbers and abs(float(ours) - float(theirs)) <= 1e-9 * max(1.0, abs(float(ours))):
        return []
    return [] if not numbers and ours == theirs else [f"{path} {theirs} vs {ours}"]


def _cross_check_results(run: Run) -> None:
    """results.json is outside every manifest: compare it with what the committed files say."""
    path = run.path / "results.json"
    if not path.exists():
        run.warnings.append("results.json missing (metrics recomputed from the committed periods)")
        return
    try:
        saved = _read_json(path)
    except (OSError, ValueError) as exc:
        run.warnings.append(f"results.json unreadable ({exc}); metrics recomputed from the committed periods")
        return
    ours = run.metrics or {}
    theirs = saved.get("metrics") or {}
    diffs = []
    if run.kind == "stream":
        if saved.get("kind") != "stream":
            diffs.append(f"kind {saved.get('kind')} vs stream")
        for key in STREAM_CHECKED_KEYS:
            diffs += _differences(ours.get(key), theirs.get(key), key)
    for key in SCALAR_KEYS if run.kind == "temporal" else ():
        if key.startswith(ANSWER_VIEWS) and key not in theirs:
            continue  # written before the answer kinds existed: nothing to disagree with
        a, b = ours.get(key), theirs.get(key)
        if (a is None) != (b is None) or (a is not None and abs(float(a) - float(b)) > 1e-9):
            diffs.append(f"{key} {b} vs {a}")
    last = run.rows[-1].trainable_sha256
    if saved.get("final_state_sha256") and last and saved["final_state_sha256"] != last:
        diffs.append("final_state_sha256 differs from the last period's trainable_sha256")
    if diffs:
        run.warnings.append("results.json disagrees with the committed predictions (used the latter): "
                            + "; ".join(diffs[:4]))


class _InFlux(Exception):
    """A period dir was replaced while we read it; reading the run again gives a consistent view."""


def read_run(path: Path, benches: _BenchmarkCache | None = None, attempts: int = 3) -> Run:
    """Everything the report needs from one run directory; never raises (errors become status failed)."""
    benches = benches or _BenchmarkCache()
    for attempt in range(attempts):
        run = Run(run_id=path.name, path=path)
        try:
            _read_run(run, benches)
            return run
        except _InFlux as exc:
            if attempt + 1 == attempts:
                run.status, run.metrics = "running", None
                run.reason = f"{exc} {attempts} times (a writer is re-committing it); run the report again"
                return run
            time.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 -- a report must list a broken run, not die on it
            run.status = "failed"
            run.reason = f"unreadable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            run.metrics = None
            return run
    return run


def _confidence_trace(run_dir: Path, committed: int) -> list[tuple[int, int, float, bool]]:
    """CASMO's confidence per optimizer step of the committed periods (train_log.jsonl), in order."""
    try:
        rows = _read_jsonl(run_dir / "train_log.jsonl")
    except (OSError, ValueError):
        return []
    trace = [(int(r["period"]), int(r["step"]), float(r["casmo_confidence"]), bool(r.get("casmo_calibrating")))
             for r in rows if r.get("event") == "train" and "casmo_confidence" in r and r.get("period", 0) <= committed]
    return sorted(trace)


def _read_run(run: Run, benches: _BenchmarkCache) -> None:
    path = run.path
    if not (path / "config.yaml").is_file():
        run.reason = "no config.yaml (the run never got past validation)"
        return
    config = yaml.safe_load(_read_text(path / "config.yaml"))
    if not isinstance(config, dict):
        run.reason = "config.yaml is not a mapping"
        return
    run.config = config
    run.method = str((config.get("method") or {}).get("name", "?"))
    run.seed = config.get("seed")
    run.mode = str(config.get("mode", "?"))
    run.model = model_label(config)
    run.variant = variant_of(config)
    data_cfg = config.get("data") or {}
    stream: StreamData | None = None
    bench: Benchmark | None = None
    # A stream run keeps data/stream.json; its config names the stream file (absent for temporal runs).
    if (path / "data" / STREAM_FILE).is_file() or data_cfg.get("stream"):
        run.kind = "stream"
        if not (path / "data" / STREAM_FILE).is_file():
            run.reason = f"data/{STREAM_FILE} missing (the run never committed its data)"
            run.benchmark = Path(str(data_cfg.get("stream"))).stem
            return
        stream = benches.load_stream(path / "data")
        run.benchmark, run.fingerprint = stream.stream.name, stream.stream.fingerprint
        run.period_names, run.stream_order = stream.task_names, stream.stream.order
    elif not (path / "data" / BENCHMARK_FILE).is_file():
        run.reason = f"data/{BENCHMARK_FILE} missing (the run never committed its data)"
        run.benchmark = str(data_cfg.get("benchmark", "?"))
        return
    else:
        bench = benches.load(path / "data")
        run.benchmark, run.fingerprint, run.period_names = bench.name, bench.fingerprint, bench.period_names

    run_meta: dict[str, Any] = {}
    try:
        run_meta = _read_json(path / "run.json")
    except (OSError, ValueError):
        pass
    expected_hash = run_meta.get("config_hash")
    names = ["base"] + run.period_names
    problem = ""
    periods_dir = path / "periods"
    for k, name in enumerate(names):
        directory = periods_dir / f"{k}-{name}"
        if not directory.is_dir():
            break
        got = _read_row(directory, k, name, run, stream=stream)
        if got is None:  # vanished or kept changing while read: a writer is re-committing it
            raise _InFlux(f"periods/{directory.name} changed while being read")
        if isinstance(got, str):
            problem = f"periods/{directory.name}: {got}"
            break
        row, manifest = got
        expected_hash = expected_hash or manifest.get("config_hash")
        if manifest.get("config_hash") != expected_hash:
            problem = (f"periods/{directory.name} was committed under config hash "
                       f"{str(manifest.get('config_hash'))[:8]}, the run has {str(expected_hash)[:8]}")
            break
        if manifest.get("data_fingerprint") not in (None, run.fingerprint):
            problem = f"periods/{directory.name} was evaluated on other data (fingerprint differs)"
            break
        run.is_bound = run.is_bound or bool(manifest.get("is_bound"))
        run.rows.append(row)
    run.confidence_trace = _confidence_trace(path, len(run.rows) - 1)

    # Period dirs beyond the valid prefix (a gap, or names the benchmark does not have).
    known = {f"{k}-{n}" for k, n in enumerate(names)}
    valid = {f"{r.index}-{r.name}" for r in run.rows}
    try:
        present = sorted(e for e in os.listdir(periods_dir) if not e.startswith("."))
    except OSError:
        present = []
    stray = [e for e in present if e not in valid and (path / "periods" / e).is_dir()]
    if not problem:
        unknown = [e for e in stray if e not in known]
        later = [e for e in stray if e in known]
        if unknown:
            run.warnings.append(f"period dirs not in the {'stream' if stream else 'benchmark'} ignored: "
                                f"{', '.join(unknown)}")
        if later:
            missing = f"{len(run.rows)}-{names[len(run.rows)]}" if len(run.rows) < len(names) else "?"
            # A writer re-committing that dir (commit_dir) leaves it absent for the instant between its
            # two renames; if it is back a moment later, this was that instant, not a gap: read again.
            time.sleep(0.05)
            if (periods_dir / missing).is_dir():
                raise _InFlux(f"periods/{missing} was replaced while being read")
            problem = f"periods/{', '.join(later)} present but periods/{missing} is not committed"

    t_count = len(run.period_names)
    if problem:
        run.status, run.reason = "corrupted", problem
    elif len(run.rows) == t_count + 1:
        run.status = "complete"
    else:
        holder = live_holder(path)
        event = _last_event(path, run.period_names if stream else None)
        hints = [h for h in (_step_checkpoints(path), event) if h]
        if holder is not None:
            run.status = "running"
            who = f"host={holder.get('host', '?')} pid={holder.get('pid', '?')} job={holder.get('slurm_job_id')}"
            run.reason = f"{run.num_committed} of {t_count} {run.unit} committed; writer alive ({who})"
        else:
            run.status = "partial"
            run.reason = (f"{run.num_committed} of {t_count} {run.unit} committed"
                          + ("" if run.rows else " (not even the base row)")
                          + "; no live writer (killed, preempted or crashed)")
        if hints:
            run.reason += "; " + "; ".join(hints)
    if run.status == "complete":
        run.metrics = _recompute_stream_metrics(run, stream) if stream else _recompute_metrics(run, bench)
        _recompute_retention(run)
        _cross_check_results(run)


def find_run_dirs(root: Path, skip: Iterable[Path] = (), max_depth: int = 3) -> list[Path]:
    """Run directories under root (a dir with config.yaml or periods/); root itself may be one."""
    skip_set = {p.resolve() for p in skip}

    def is_run(d: Path) -> bool:
        return (d / "config.yaml").is_file() or (d / "periods").is_dir()

    if is_run(root):
        return [root]
    found: list[Path] = []
    stack = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue  # hidden and in-flight (.tmp-) entries; links may lead out of the run root
            sub = Path(entry.path)
            if sub.resolve() in skip_set:
                continue
            if is_run(sub):
                found.append(sub)
            elif depth + 1 < max_depth:
                stack.append((sub, depth + 1))
    return sorted(found)


# ------------------------------------------------------------------------------------------
# aggregation


def mean_ci(values: Iterable[Any], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean and the t-interval of the mean over finite values: mean ± t_{(1+c)/2, n-1} * sd / sqrt(n).

    sd uses ddof = 1. n < 2 gives no interval (half = None); n = 0 gives mean None.
    """
    from scipy import stats

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    out: dict[str, Any] = {"n": n, "mean": None, "sd": None, "half": None, "low": None, "high": None,
                           "values": xs}
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
        return {"benchmark": self.benchmark, "model": self.model, "method": self.method, "variant": self.variant,
                "label": self.label, "period_names": self.period_names, "n": self.n, "seeds": self.seeds,
                "runs": [r.run_id for r in self.runs], "complete_runs": [r.run_id for r in self.complete],
                "metrics": self.metrics, "per_period": self.per_period,
                # a stream's matrix is of each task's primary metric, not EM: it is under "stream"
                "matrix_storage_em_mean": self.matrix_mean if self.kind == "temporal" else None,
                "matrix_storage_em_ci95_half": self.matrix_half if self.kind == "temporal" else None,
                "forgetting_curve": self.forgetting_curve,
                "method_extras": self.extras, "lm_eval": self.lm_eval, "landscape": self.landscape,
                "retention": self.retention,
                "kind": self.kind, "stream": self.stream or None}


def forgetting_curve(matrix: Sequence[Sequence[float | None]]) -> list[float | None]:
    """F(k) for k = 2..T: mean over t < k of max_{l=t..k-1} R[l][t] - R[k][t] (1-based periods).

    F(T) is exactly the run's ``forgetting`` metric; earlier points truncate the sequence at k.
    """
    t_count = len(matrix) - 1
    out: list[float | None] = []
    for k in range(2, t_count + 1):
        terms = []
        for t in range(1, k):
            best = [matrix[l][t - 1] for l in range(t, k) if matrix[l][t - 1] is not None]
            if best and matrix[k][t - 1] is not None:
                terms.append(max(best) - matrix[k][t - 1])
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
            cfg = json.loads(json.dumps(runs_by_key[key][0].config or {}, default=str))
            for drop in _NOT_VARIANT:
                _drop(cfg, drop)
            flats[key] = _flat(cfg)
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


def _aggregate_temporal(group: Group, runs: list[Run]) -> None:
    for key in SCALAR_KEYS:
        group.metrics[key] = mean_ci(r.metrics.get(key) for r in runs)
    for key in PER_PERIOD_KEYS:
        group.per_period[key] = [mean_ci(r.metrics[key][k] for r in runs) for k in range(len(group.period_names))]
    # The figures' matrix is the storage one (the extraction matrix stays in each run's results.json).
    group.matrix_mean, group.matrix_half = _agg_matrix([r.metrics["matrix_storage_em"] for r in runs])
    curves = [forgetting_curve(r.metrics["matrix_storage_em"]) for r in runs]
    group.forgetting_curve = [mean_ci(c[i] for c in curves) for i in range(len(group.period_names) - 1)]


def _aggregate_stream(group: Group, runs: list[Run]) -> None:
    """Seed aggregates of a stream group. The runs share the stream (same fingerprint), so tasks, primary
    metrics and directions are those of the first run."""
    first = runs[0].metrics
    tasks = list(first["tasks"])
    t_count = len(tasks)
    for summary, keys in STREAM_SUMMARIES.items():
        for key, _, _ in keys:
            group.metrics[f"{summary}.{key}"] = mean_ci((r.metrics.get(summary) or {}).get(key) for r in runs)
    group.matrix_mean, group.matrix_half = _agg_matrix([r.metrics["matrix"] for r in runs])

    def column(row_of: Any) -> dict[str, dict[str, Any]]:
        return {t: mean_ci(r.metrics["matrix"][row_of(j)][j] for r in runs) for j, t in enumerate(tasks)}

    matrices: dict[str, dict[str, dict[str, list[float | None]]]] = {}
    for t in tasks:
        matrices[t] = {}
        for metric in first["matrices"][t]:
            aggs = [mean_ci(r.metrics["matrices"][t][metric][k] for r in runs) for k in range(t_count + 1)]
            matrices[t][metric] = {"mean": [a["mean"] for a in aggs], "ci95_half": [a["half"] for a in aggs]}
    group.stream = {
        "order": runs[0].stream_order, "tasks": tasks, "primary_metric": dict(first["primary_metric"]),
        "higher_is_better": dict(first["higher_is_better"]),
        "scorers": {t: first["scorers"][t]["name"] for t in tasks}, "eval_counts": dict(first["eval_counts"]),
        "matrix_mean": group.matrix_mean, "matrix_ci95_half": group.matrix_half,
        # R[0][t] (base model), R[t][t] (right after training on t) and R[T][t] (final), per task
        "base": column(lambda j: 0), "just_trained": column(lambda j: j + 1), "final": column(lambda j: t_count),
        # in how many of the group's complete runs each higher-is-better task was base-solved
        "base_solved": {t: sum(t in (r.metrics.get("base_solved") or []) for r in runs)
                        for t in tasks if first["higher_is_better"][t]},
        "base_solved_margin": first.get("base_solved_margin"),
        "matrices": matrices,
    }


def _aggregate_group(group: Group) -> None:
    runs = [r for r in group.complete if r.metrics]
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
    tracks = [(r.metrics or {}).get("retention") for r in runs]
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
        group = Group(benchmark=bench_label, model=key[2], method=key[3], variant=key[4], label=labels[key] + bound,
                      period_names=by_key[key][0].period_names, kind=by_key[key][0].kind,
                      runs=sorted(by_key[key], key=lambda r: (r.seed is None, r.seed, r.run_id)))
        _aggregate_group(group)
        groups.append(group)
    return groups


# ------------------------------------------------------------------------------------------
# tidy rows


CSV_COLUMNS = ["run_id", "status", "benchmark", "model", "method", "variant", "seed", "period_index", "period_name",
               "scope", "probe_period", "metric", "value"]


def tidy_rows(runs: Sequence[Run], groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per run x period x metric. scope: cell (score of a row on one period's probes), period
    (one value per model state), run (one value per run, reported at the last period).

    Stream runs: a cell is a row's score on one task (probe_period = the task) for every metric of the
    task's scorer and "n", re-aggregated from the predictions; run-scope metrics are named
    "higher_is_better_summary.<key>" / "lower_is_better_summary.<key>", plus "base_solved" (1 or 0) per
    higher-is-better task."""
    bench_label = {r.run_id: g.benchmark for g in groups for r in g.runs}
    out: list[dict[str, Any]] = []
    for run in runs:
        base = {"run_id": run.run_id, "status": run.status, "benchmark": bench_label.get(run.run_id, run.benchmark),
                "model": run.model, "method": run.method, "variant": run.variant, "seed": run.seed}

        def add(k: int, scope: str, metric: str, value: Any, probe_period: str = "", run: Run = run,
                base: dict[str, Any] = base) -> None:
            if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
                return
            name = "base" if k == 0 else run.period_names[k - 1]
            out.append({**base, "period_index": k, "period_name": name, "scope": scope,
                        "probe_period": probe_period, "metric": metric, "value": value})

        for row in run.rows:
            if run.kind == "stream":
                for task, cell in row.task_scores.items():
                    for m, value in cell.items():
                        add(row.index, "cell", m, value, task)
            for key, cell in sorted(row.scores.items()) if run.kind == "temporal" else ():
                period, _, family = key.partition("/")
                prefix = f"{family}_" if family else ""
                for m in ("em", "f1", "n"):
                    add(row.index, "cell", f"{prefix}{m}", cell.get(m), period)
            for key, value in _numeric_leaves(row.extras).items():
                add(row.index, "period", f"extra/{key}", value)
            for key in ("total_steps", "tokens"):
                add(row.index, "period", f"train/{key}", row.train.get(key))
            for key, value in sorted(((row.landscape or {}).get("metrics") or {}).items()):
                add(row.index, "period", f"landscape/{key}", value)
            for key, (value, _) in sorted(lm_eval_scores(row.lm_eval).items()):
                add(row.index, "period", f"lm_eval/{key}", value)
        if run.metrics and run.kind == "stream":
            t_count = run.num_periods
            for summary, keys in STREAM_SUMMARIES.items():
                for key, _, _ in keys:
                    add(t_count, "run", f"{summary}.{key}", (run.metrics.get(summary) or {}).get(key))
            solved = set(run.metrics.get("base_solved") or [])
            for task, higher in run.metrics["higher_is_better"].items():
                if higher:
                    add(t_count, "run", "base_solved", int(task in solved), task)
        elif run.metrics:
            t_count = run.num_periods
            for family in FAMILIES:
                for k, row in enumerate(run.metrics.get(f"matrix_{family}_logprob") or []):
                    for t, value in enumerate(row):
                        add(k, "cell", f"{family}_logprob", value, run.period_names[t])
            for key in PER_PERIOD_KEYS:
                for k, value in enumerate(run.metrics.get(key) or [], start=1):
                    add(k, "period", key, value)
            for key in SCALAR_KEYS:
                add(t_count, "run", key, run.metrics.get(key))
    return out


# ------------------------------------------------------------------------------------------
# rendering


def fmt(agg: dict[str, Any] | None, group_n: int | None = None, digits: int = 3) -> str:
    """'0.412 ± 0.031' (95% CI half-width); '(n=k)' appended when k differs from the group's n."""
    if not agg or agg.get("mean") is None:
        return "–"
    text = f"{agg['mean']:.{digits}f}"
    if agg.get("half") is not None:
        text += f" ± {agg['half']:.{digits}f}"
    if group_n is None or agg["n"] != group_n or agg.get("half") is None:
        text += f" (n={agg['n']})"
    return text


def _by_benchmark(groups: Sequence[Group]) -> dict[str, list[Group]]:
    out: dict[str, list[Group]] = defaultdict(list)
    for g in groups:
        out[g.benchmark].append(g)
    return dict(out)


def _summary_header(groups: Sequence[Group]) -> tuple[list[str], bool]:
    multi_model = len({g.model for g in groups}) > 1
    head = ["method"] + (["model"] if multi_model else []) + ["n", "seeds", "not complete"]
    head += [f"{SUMMARY_LABELS[k]} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in SUMMARY_KEYS]
    return head, multi_model


def _summary_cells(g: Group, multi_model: bool) -> list[str]:
    cells = [g.label] + ([g.model] if multi_model else [])
    cells += [str(g.n), ",".join(str(s) for s in g.seeds) or "–", str(len(g.runs) - g.n)]
    cells += [fmt(g.metrics.get(k), g.n) for k in SUMMARY_KEYS]
    return cells


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _lm_eval_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    names = max((g.period_names for g in groups), key=len)
    head = ["method", "task/metric", "better", "base"] + [f"Δ after {p}" for p in names]
    rows = []
    for g in groups:
        for key, entry in sorted(g.lm_eval.items()):
            rows.append([g.label, key, "higher" if entry["higher_is_better"] else "LOWER",
                         fmt(entry["value"][0], g.n)] + [fmt(d, g.n) for d in entry["delta"][1:]])
    return head, rows


def _retention_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    names = max((g.period_names for g in groups), key=len)
    head = (["method", "task/metric", "better", "base"] + [f"drop after {p}" for p in names]
            + ["relative drop (final)", "final drop, 95% item interval (one run)"])
    rows = []
    for g in groups:
        for key, entry in g.retention.items():
            ci = entry["item_ci"]
            rows.append([g.label, key, "higher" if entry["higher_is_better"] else "LOWER", fmt(entry["base"], g.n)]
                        + [fmt(d, g.n) for d in entry["drop"][1:]] + [fmt(entry["rel_drop_final"], g.n)]
                        + [f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else "-"])
    return head, rows


def _landscape_rows(groups: Sequence[Group]) -> tuple[list[str], list[list[str]]]:
    head = ["method", "period", "center loss", "loss range", "std", "max curvature", "λmax (Fisher)",
            "‖Δw‖", "forgetting estimate"]
    keys = ["center_loss", "loss_range", "std_loss", "max_curvature", "fisher_top_eigenvalue", "delta_w_norm",
            "forgetting_estimate"]
    rows = []
    for g in groups:
        if not g.landscape:
            continue
        for k, name in enumerate(["base"] + g.period_names):
            aggs = [g.landscape.get(key, [None] * (k + 1))[k] for key in keys]
            if all(a is None for a in aggs):
                continue
            rows.append([g.label, name] + [fmt(a, g.n, 4) for a in aggs])
    return head, rows


def _arrow(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


# A block of a stream's section, rendered by both summary.md and report.html: ("h", heading),
# ("p", paragraph) or ("table", head, rows, index of the first numeric column).
Block = tuple[Any, ...]


def _stream_blocks(groups: Sequence[Group]) -> list[Block]:
    """The tables of one stream: higher-is-better summary, lower-is-better summary (each only when the
    stream has such tasks; never averaged together) and the final score per task, base-solved marked."""
    ready = [g for g in groups if g.stream]
    if not ready:
        return [("p", "No complete run yet: nothing to aggregate.")]
    info = ready[0].stream
    tasks, primary, higher = info["tasks"], info["primary_metric"], info["higher_is_better"]
    hi = [t for t in tasks if higher[t]]
    lo = [t for t in tasks if not higher[t]]
    multi_model = len({g.model for g in groups}) > 1
    described = ", ".join(f"{t} ({info['scorers'][t]}: {primary[t]} {_arrow(higher[t])}, "
                          f"{info['eval_counts'][t]} items)" for t in tasks)
    blocks: list[Block] = [("p", f"Tasks in training order: {described}. R[i][t] is task t's primary metric after "
                                 "training through task i (row 0 = the base model); formulas: docs/metrics.md §10.")]

    def prefix(g: Group) -> list[str]:
        return [g.label] + ([g.model] if multi_model else []) + [
            str(g.n), ",".join(str(s) for s in g.seeds) or "–", str(len(g.runs) - g.n)]

    head0 = ["method"] + (["model"] if multi_model else []) + ["n", "seeds", "not complete"]
    if hi:
        blocks += [("h", f"Higher-is-better tasks ({', '.join(hi)})"),
                   ("p", "Summary over the tasks whose primary metric is higher-is-better (accuracy, pass@1, EM, "
                         "F1, ROUGE-L). ACC is macro (each task once), ACC micro pools the eval items; ↓ marks the "
                         "columns where lower is better (forgetting, max drop, FG%)."),
                   ("table", head0 + [f"{label} {_arrow(up)}" for _, label, up in STREAM_HIGHER_KEYS],
                    [prefix(g) + [fmt(g.metrics.get(f"higher_is_better_summary.{k}"), g.n)
                                  for k, _, _ in STREAM_HIGHER_KEYS] for g in groups], len(head0))]
    if lo:
        metric = "/".join(sorted({primary[t] for t in lo}))
        blocks += [("h", f"Lower-is-better tasks ({', '.join(lo)}): {metric}"),
                   ("p", "Summarised apart and never averaged with the tasks above. Every column is lower-is-better "
                         "(↓): BWT > 0 and forgetting > 0 mean the loss rose again after the task was trained, "
                         "learning < 0 means training on the task lowered its loss."),
                   ("table", head0 + [f"{metric} {label} {_arrow(up)}" if key != "final" else f"final {metric} ↓"
                                      for key, label, up in STREAM_LOWER_KEYS],
                    [prefix(g) + [fmt(g.metrics.get(f"lower_is_better_summary.{k}"), g.n)
                                  for k, _, _ in STREAM_LOWER_KEYS] for g in groups], len(head0))]
    rows = []
    for t in tasks:
        cells = [t, info["scorers"][t], f"{primary[t]} {_arrow(higher[t])}"]
        for g in groups:
            solved = (g.stream or {}).get("base_solved", {}).get(t, 0)
            cell = fmt((g.stream or {}).get("final", {}).get(t), g.n)
            cells.append(cell + (f" {BASE_SOLVED_MARK}{solved}/{g.n}" if solved else ""))
        rows.append(cells)
    marked = [f"{g.label}: " + ", ".join(f"{t} ({k}/{g.n})" for t, k in g.stream["base_solved"].items() if k)
              for g in ready if any(g.stream["base_solved"].values())]
    labels = [g.label + (f" ({g.model})" if multi_model else "") for g in groups]
    blocks += [("h", "Final score per task"),
               ("table", ["task", "scorer", "primary metric"] + labels, rows, 3)]
    if marked:
        margin = info.get("base_solved_margin")
        blocks.append(("p", f"{BASE_SOLVED_MARK}k/n: base-solved in k of the method's n complete runs, i.e. "
                            f"R[0][t] ≥ R[t][t] − {margin} (docs/metrics.md §10): training on the task added "
                            "nothing measurable over the base model, so a later change of its score is drift, not "
                            "forgetting of something learnt. Such tasks still count in the summaries above. "
                            f"Base-solved: {'; '.join(marked)}."))
    return blocks


def _attention_runs(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if r.status != "complete"]


def render_summary_md(root: Path, runs: Sequence[Run], groups: Sequence[Group], generated: str) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    lines = [
        "# Continual-learning report", "",
        f"Run root: `{root}`  ",
        f"Generated: {generated}  ",
        f"Runs: {len(runs)} (" + ", ".join(f"{counts[s]} {s}" for s in STATUSES) + ")", "",
        ("Cells are the mean over seeds ± the half-width of the 95% confidence interval of the mean "
         "(t-distribution, n−1 degrees of freedom; sd with ddof = 1), over the complete runs of the group. "
         "`(n=k)` marks a cell averaged over k runs, when that differs from the group's n or when "
         "k = 1 (no interval). ↑ higher is better, ↓ lower is better. Metric formulas: docs/metrics.md."), "",
    ]
    for bench, gs in _by_benchmark(groups).items():
        models = ", ".join(sorted({g.model for g in gs}))
        if gs[0].kind == "stream":
            lines += [f"## {bench}", "", f"Model: {models}", ""]
            for block in _stream_blocks(gs):
                if block[0] == "h":
                    lines += [f"### {block[1]}", ""]
                elif block[0] == "p":
                    lines += [block[1], ""]
                else:
                    lines += [_md_table(block[1], block[2]), ""]
        else:
            head, multi_model = _summary_header(gs)
            lines += [f"## {bench}", "", f"Periods: {', '.join(gs[0].period_names)}; model: {models}", ""]
            lines += [_md_table(head, [_summary_cells(g, multi_model) for g in gs]), ""]
        # the optional sections: (present?, title, note, the table's rows)
        sections = [
            (any(g.lm_eval for g in gs), "General ability (lm-eval), change vs the base model",
             ("Δ = score after the period − the same run's base score; for a metric marked LOWER (e.g. perplexity, "
              "CrowS-Pairs likelihood difference / pct stereotype) a negative Δ is an improvement."), _lm_eval_rows),
            (any(g.retention for g in gs), "Retention: held-out tasks, drop vs the base model",
             ("drop = base − value for a higher-is-better metric, value − base for a LOWER one, so a positive drop is "
              "ability lost in both; relative drop = drop / |base| (docs/metrics.md, section 11)."), _retention_rows),
            (any(g.landscape for g in gs), "Loss landscape per period checkpoint", "", _landscape_rows),
        ]
        for present, title, note, table in sections:
            if present:
                h, rows = table(gs)
                lines += [f"### {title}", ""] + ([note, ""] if note else []) + [_md_table(h, rows), ""]
    attention = _attention_runs(runs)
    lines += ["## Runs not in the aggregates", ""]
    if attention:
        rows = [[r.run_id, r.status, f"{r.num_committed}/{r.num_periods or '?'}", r.reason] for r in attention]
        lines += [_md_table(["run", "status", "periods committed", "reason"], rows), ""]
    elif runs:
        lines += ["None: every run is complete.", ""]
    else:
        lines += [f"No run directories found under `{root}` (a run directory holds config.yaml or periods/).", ""]
    warned = [r for r in runs if r.warnings]
    if warned:
        lines += ["## Warnings", ""]
        lines += [f"- `{r.run_id}`: {w}" for r in warned for w in r.warnings]
        lines.append("")
    return "\n".join(lines)


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{margin-bottom:4px} h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.badge{display:inline-block;padding:2px 8px;border-radius:10px;margin-right:6px;font-size:13px;color:#fff}
.complete{background:#2e7d32}.running{background:#1565c0}.partial{background:#ef6c00}
.corrupted{background:#c62828}.failed{background:#6a1b9a}
.plots{display:flex;flex-wrap:wrap;gap:12px}
.plots figure{margin:0;border:1px solid #eee;padding:6px;max-width:100%;box-sizing:border-box}
.plots img{max-width:100%;height:auto;display:block} figcaption{font-size:12px;color:#555}
pre{background:#f7f7f7;padding:8px;overflow-x:auto;font-size:12px} .note{color:#555;font-size:13px}
.warn{color:#b71c1c}
"""

# Marks images that failed to decode, so a broken page says so instead of showing blank boxes; the
# body attribute lets a headless-browser test check that every plot rendered.
_JS = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { ok += 1; return; }
    var p = document.createElement('p'); p.className = 'warn';
    p.textContent = 'image failed to render: ' + img.alt; img.replaceWith(p);
  });
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
});
"""


def _h(text: Any) -> str:
    return html.escape(str(text))


def _html_table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 99) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_h(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i >= numeric_from else ""
            cells.append(f"<td{cls}>{cell if isinstance(cell, _Raw) else _h(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


class _Raw(str):
    """A table cell that is already HTML."""


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{_h(caption)}">'
            f"<figcaption>{_h(caption)}</figcaption></figure>")


def render_html(root: Path, runs: Sequence[Run], groups: Sequence[Group], plots: dict[str, list[tuple[Path, str]]],
                generated: str) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in STATUSES}
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<title>Continual-learning report</title>", f"<style>{_CSS}</style>", f"<script>{_JS}</script>",
             "</head><body>", "<h1>Continual-learning report</h1>",
             f"<p class='note'>Run root <code>{_h(root)}</code> · generated {_h(generated)} · {len(runs)} runs</p>",
             "<p>" + "".join(f"<span class='badge {s}'>{counts[s]} {s}</span>" for s in STATUSES) + "</p>"]
    attention = _attention_runs(runs)
    if attention:
        parts.append("<h2>Runs not in the aggregates</h2>")
        rows = [[r.run_id, _Raw(f"<span class='badge {r.status}'>{r.status}</span>"),
                 f"{r.num_committed}/{r.num_periods or '?'}", r.reason] for r in attention]
        parts.append(_html_table(["run", "status", "periods committed", "reason"], rows))
    parts.append("<p class='note'>Cells: mean over seeds ± half-width of the 95% t-interval of the mean "
                 "(n−1 degrees of freedom), over complete runs; (n=k) marks cells over k runs when k differs "
                 "from the group's n or k = 1. ↑ higher is better, ↓ lower is better. Formulas: "
                 "docs/metrics.md.</p>")
    for bench, gs in _by_benchmark(groups).items():
        models = ", ".join(sorted({g.model for g in gs}))
        if gs[0].kind == "stream":
            parts += [f"<h2>{_h(bench)}</h2>", f"<p class='note'>model {_h(models)}</p>"]
            for block in _stream_blocks(gs):
                if block[0] == "h":
                    parts.append(f"<h3>{_h(block[1])}</h3>")
                elif block[0] == "p":
                    parts.append(f"<p class='note'>{_h(block[1])}</p>")
                else:
                    parts.append(_html_table(block[1], block[2], block[3]))
        else:
            head, multi_model = _summary_header(gs)
            numeric = len(head) - len(SUMMARY_KEYS)
            parts += [f"<h2>{_h(bench)}</h2>",
                      f"<p class='note'>Periods {_h(', '.join(gs[0].period_names))} · model {_h(models)}</p>",
                      _html_table(head, [_summary_cells(g, multi_model) for g in gs], numeric)]
        parts.append("<div class='plots'>" + "".join(_img(p, c) for p, c in plots.get(bench, [])) + "</div>")
        if any(g.lm_eval for g in gs):
            h, rows = _lm_eval_rows(gs)
            parts += ["<h3>General ability (lm-eval): change vs the base model</h3>",
                      ("<p class='note'>Δ = score after the period − the same run's base score. For metrics "
                       "marked LOWER a negative Δ is an improvement.</p>"), _html_table(h, rows, 3)]
        if any(g.retention for g in gs):
            h, rows = _retention_rows(gs)
            parts += ["<h3>Retention: held-out tasks, drop vs the base model</h3>",
                      ("<p class='note'>A positive drop is ability lost (base − value, or value − base for LOWER "
                       "metrics); relative drop = drop / |base| (docs/metrics.md, section 11).</p>"),
                      _html_table(h, rows, 3)]
        if any(g.landscape for g in gs):
            h, rows = _landscape_rows(gs)
            parts += ["<h3>Loss landscape per period checkpoint</h3>", _html_table(h, rows, 2)]
            figures = []
            for g in gs:
                for run in g.complete[:1]:
                    for row in run.rows:
                        d = run.path / "periods" / f"{row.index}-{row.name}" / LANDSCAPE_DIR
                        if row.landscape and (d / "contour.png").is_file():
                            figures.append(_img(d / "contour.png", f"{g.label} seed {run.seed}: {row.name}"))
            if figures:
                parts.append("<div class='plots'>" + "".join(figures[:12]) + "</div>")
    parts.append("<h2>All runs</h2>")
    rows = [[r.run_id, r.benchmark, r.method, r.seed, _Raw(f"<span class='badge {r.status}'>{r.status}</span>"),
             f"{r.num_committed}/{r.num_periods or '?'}", "; ".join(r.warnings)] for r in runs]
    parts.append(_html_table(["run", "benchmark", "method", "seed", "status", "periods", "warnings"], rows))
    parts.append("<h2>Configs</h2><p class='note'>The resolved config.yaml of the first run of each group; "
                 "the other runs differ only in the seed.</p>")
    for g in groups:
        first = g.runs[0]
        parts.append(f"<details><summary>{_h(g.benchmark)} · {_h(g.label)} · {_h(g.model)} · "
                     f"{len(g.runs)} runs</summary><p class='note'>runs: {_h(', '.join(r.run_id for r in g.runs))}"
                     f"</p><pre>{_h(yaml.safe_dump(first.config, sort_keys=False))}</pre></details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


def make_plots(groups: Sequence[Group], directory: Path) -> dict[str, list[tuple[Path, str]]]:
    from eval_and_metrics import plots

    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[tuple[Path, str]]] = {}
    for i, (bench, gs) in enumerate(_by_benchmark(groups).items()):
        stem = f"{i}-{_slug(bench)}"
        made = []
        stream_figures = (
            (plots.stream_score_heatmaps, "matrix", "final score matrix per method (primary metric)"),
            (plots.stream_task_curves, "task_curves", "each task's primary metric over the stream"),
            (plots.lm_eval_deltas, "lm_eval", "general ability vs base (lm-eval)"),
            (plots.landscape_trends, "landscape", "loss landscape per task checkpoint"),
            (plots.confidence_traces, "confidence", "CASMO confidence per optimizer step (dashed: task boundaries)"),
        )
        temporal_figures = (
            (plots.summary_bars, "summary", "summary metrics"),
            (plots.accuracy_heatmaps, "matrix", "accuracy matrix per method"),
            (plots.timelines, "timelines", "each period's score over the sequence"),
            (plots.final_scores, "final", "final scores per period"),
            (plots.forgetting_curves, "forgetting", "forgetting curves"),
            (plots.plasticity_stability, "plasticity_stability", "plasticity vs stability"),
            (plots.lm_eval_deltas, "lm_eval", "general ability vs base (lm-eval)"),
            (plots.landscape_trends, "landscape", "loss landscape per period"),
            (plots.confidence_traces, "confidence", "CASMO confidence per optimizer step (dashed: period boundaries)"),
        )
        for fn, name, caption in stream_figures if gs[0].kind == "stream" else temporal_figures:
            path = fn(gs, directory / f"{stem}-{name}.png", bench)
            if path is not None:
                made.append((path, f"{bench}: {caption}"))
        out[bench] = made
    return out


# ------------------------------------------------------------------------------------------
# the job


class ReportError(ValueError):
    """Bad input for the report (exit 2)."""


def _check_out(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ReportError(f"--out {out} exists and is not a directory")
    if any(out.iterdir()) and (read_manifest(out) or {}).get("kind") != REPORT_KIND:
        raise ReportError(f"--out {out} is a non-empty directory that is not a previous report; it would be "
                          "replaced, so pick an empty or new directory")


def gather(root: Path, skip: Iterable[Path] = (), jobs: int = 4) -> list[Run]:
    dirs = find_run_dirs(root, skip)
    benches = _BenchmarkCache()
    if any((d / "data" / STREAM_FILE).is_file() for d in dirs):
        _scorer_registry()  # the torch import, once, before the reader threads start
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # hashing releases the GIL
        return list(pool.map(lambda d: read_run(d, benches), dirs))


def build_report(root: Path, out: Path, jobs: int = 4) -> dict[str, Any]:
    """Gather, aggregate and write every output; returns the results.json object."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ReportError(f"run root {root} is not a directory")
    _check_out(out)
    generated = utc_now_iso()
    runs = gather(root, skip=[out], jobs=jobs)
    groups = build_groups(runs)
    tmp = staging_dir(out)
    try:
        plots = make_plots(groups, tmp / "plots")
        result = {
            "schema_version": REPORT_SCHEMA_VERSION, "generated_at": generated, "run_root": str(root),
            "confidence": CONFIDENCE, "interval": "t-interval of the mean: mean ± t_{0.975,n-1} * sd / sqrt(n)",
            "counts": {s: sum(r.status == s for r in runs) for s in STATUSES},
            "runs": [{**r.summary(), "metrics": r.metrics} for r in runs],
            "groups": [g.to_json() for g in groups],
            "plots": {b: [p.relative_to(tmp).as_posix() for p, _ in made] for b, made in plots.items()},
        }
        (tmp / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True, allow_nan=False) + "\n")
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(tidy_rows(runs, groups))
        (tmp / "results.csv").write_text(buf.getvalue())
        (tmp / "summary.md").write_text(render_summary_md(root, runs, groups, generated))
        (tmp / "report.html").write_text(render_html(root, runs, groups, plots, generated))
        write_manifest(tmp, {"kind": REPORT_KIND, "run_root": str(root), "num_runs": len(runs),
                             "counts": result["counts"]})
        commit_dir(tmp, out)  # files are written plainly above; commit_dir fsyncs them all first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval_and_metrics.report",
                                     description="Gather the runs under RUN_ROOT into summary.md, results.csv, "
                                     "results.json, PNG plots and a self-contained report.html.")
    parser.add_argument("run_root", help="directory holding run directories (searched 3 levels deep)")
    parser.add_argument("--out", help="output directory (default: RUN_ROOT/report); replaced atomically")
    parser.add_argument("--jobs", type=int, default=4, help="runs read in parallel (checksumming is I/O bound)")
    args = parser.parse_args(argv)
    root = Path(args.run_root)
    out = Path(args.out) if args.out else root / "report"
    started = time.time()
    try:
        result = build_report(root, out, jobs=args.jobs)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = result["counts"]
    print(f"report of {len(result['runs'])} runs (" + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
          + f") written to {out} in {time.time() - started:.1f}s: summary.md, results.csv, results.json, "
          "report.html, plots/")
    for run in result["runs"]:
        if run["status"] != "complete":
            print(f"  {run['status']:<9} {run['run_id']}: {run['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
