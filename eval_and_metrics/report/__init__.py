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

The package, one module per job (each imports only modules listed before it):

* ``records``: the run records (``Run``, ``PeriodRow``), statuses and metric keys;
* ``read``: finding, reading and verifying run directories (``read_run``, ``gather``);
* ``group``: seed groups and their aggregates (``build_groups``, ``mean_ci``);
* ``render``: results.csv rows, summary.md, report.html and the plots;
* ``cli``: the job (``build_report``) and its command line (``main``; ``__main__`` runs it).
"""

from __future__ import annotations

from artifacts.rundir import LANDSCAPE_DIR, LANDSCAPE_FILE, LM_EVAL_DIR, LM_EVAL_FILE
from eval_and_metrics.report.cli import ReportError, build_report, main
from eval_and_metrics.report.group import (
    Group,
    build_groups,
    forgetting_curve,
    lm_eval_scores,
    mean_ci,
)
from eval_and_metrics.report.read import (
    StreamData,
    find_run_dirs,
    gather,
    model_label,
    read_run,
    variant_of,
    verify_stable,
)
from eval_and_metrics.report.records import (
    ANSWER_VIEWS,
    BASE_SOLVED_MARK,
    CONFIDENCE,
    FAMILIES,
    LANDSCAPE_KEYS,
    LOWER_IS_BETTER,
    PER_PERIOD_KEYS,
    REPORT_KIND,
    REPORT_SCHEMA_VERSION,
    SCALAR_KEYS,
    STATUSES,
    STREAM_CHECKED_KEYS,
    STREAM_HIGHER_KEYS,
    STREAM_LOWER_KEYS,
    STREAM_SUMMARIES,
    SUBSET_METRICS,
    SUMMARY_KEYS,
    SUMMARY_LABELS,
    PeriodRow,
    Run,
)
from eval_and_metrics.report.render import (
    CSV_COLUMNS,
    fmt,
    make_plots,
    render_html,
    render_summary_md,
    tidy_rows,
)

__all__ = [
    "ANSWER_VIEWS",
    "BASE_SOLVED_MARK",
    "CONFIDENCE",
    "CSV_COLUMNS",
    "FAMILIES",
    "LANDSCAPE_DIR",
    "LANDSCAPE_FILE",
    "LANDSCAPE_KEYS",
    "LM_EVAL_DIR",
    "LM_EVAL_FILE",
    "LOWER_IS_BETTER",
    "PER_PERIOD_KEYS",
    "REPORT_KIND",
    "REPORT_SCHEMA_VERSION",
    "SCALAR_KEYS",
    "STATUSES",
    "STREAM_CHECKED_KEYS",
    "STREAM_HIGHER_KEYS",
    "STREAM_LOWER_KEYS",
    "STREAM_SUMMARIES",
    "SUBSET_METRICS",
    "SUMMARY_KEYS",
    "SUMMARY_LABELS",
    "Group",
    "PeriodRow",
    "ReportError",
    "Run",
    "StreamData",
    "build_groups",
    "build_report",
    "find_run_dirs",
    "fmt",
    "forgetting_curve",
    "gather",
    "lm_eval_scores",
    "main",
    "make_plots",
    "mean_ci",
    "model_label",
    "read_run",
    "render_html",
    "render_summary_md",
    "tidy_rows",
    "variant_of",
    "verify_stable",
]
