"""The job: gather, group, render into a staging dir and commit it with one rename; and its command line."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from artifacts import (
    commit_dir,
    read_manifest,
    staging_dir,
    utc_now_iso,
    write_manifest,
)
from eval_and_metrics.report.group import build_groups
from eval_and_metrics.report.read import gather
from eval_and_metrics.report.records import (
    CONFIDENCE,
    REPORT_KIND,
    REPORT_SCHEMA_VERSION,
    STATUSES,
)
from eval_and_metrics.report.render import (
    CSV_COLUMNS,
    make_plots,
    render_html,
    render_summary_md,
    tidy_rows,
)

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
        raise ReportError(
            f"--out {out} is a non-empty directory that is not a previous report; it would be "
            "replaced, so pick an empty or new directory"
        )


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
            "schema_version": REPORT_SCHEMA_VERSION,
            "generated_at": generated,
            "run_root": str(root),
            "confidence": CONFIDENCE,
            "interval": "t-interval of the mean: mean ± t_{0.975,n-1} * sd / sqrt(n)",
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
        write_manifest(
            tmp, {"kind": REPORT_KIND, "run_root": str(root), "num_runs": len(runs), "counts": result["counts"]}
        )
        commit_dir(tmp, out)  # files are written plainly above; commit_dir fsyncs them all first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval_and_metrics.report",
        description="Gather the runs under RUN_ROOT into summary.md, results.csv, "
        "results.json, PNG plots and a self-contained report.html.",
    )
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
    print(
        f"report of {len(result['runs'])} runs ("
        + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
        + f") written to {out} in {time.time() - started:.1f}s: summary.md, results.csv, results.json, "
        "report.html, plots/"
    )
    for run in result["runs"]:
        if run["status"] != "complete":
            print(f"  {run['status']:<9} {run['run_id']}: {run['reason']}")
    return 0
