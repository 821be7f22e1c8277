"""CASMO's confidence over a run: `python scripts/casmo_trace.py RUN_DIR [--out trace.png]`.

Reads RUN_DIR/train_log.jsonl (the trainer's "train" records with the optimizer's casmo_* stats), prints
per period where calibration ended (and warns where it never did: that period was plain AdamW), the mean
confidence after calibration and the AdamW learning rate that matches it (docs/optimizers.md), and with
--out plots confidence and AGAR over global steps with a line at each period boundary.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/casmo_trace.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from artifacts import RunDir  # noqa: E402


def load_trace(run_dir: Path) -> list[dict[str, Any]]:
    """The train records in (period, step) order, each with a running global_step."""
    rows = RunDir(run_dir).log_rows()
    rows = sorted((r for r in rows if r.get("event") == "train" and "casmo_confidence" in r),
                  key=lambda r: (r["period"], r["step"]))
    return [{**r, "global_step": i} for i, r in enumerate(rows, start=1)]


def summarize(trace: list[dict[str, Any]]) -> list[str]:
    lines, after = [], []
    for period in sorted({r["period"] for r in trace}):
        rows = [r for r in trace if r["period"] == period]
        calibrating = [r for r in rows if r["casmo_calibrating"]]
        rest = [r["casmo_confidence"] for r in rows if not r["casmo_calibrating"]]
        after += rest
        if not rest:
            fix = (f"lower train.casmo.calibration_steps below {len(rows)}" if len(rows) > 2
                   else "a period this short cannot calibrate (train.casmo.calibration_steps >= 2); train longer")
            lines.append(f"period {period}: {len(rows)} steps, WARNING: calibration never ended, so this period "
                         f"was plain AdamW; {fix}")
            continue
        lines.append(f"period {period}: {len(rows)} steps, calibration ended after step "
                     f"{calibrating[-1]['step'] if calibrating else 0}, mean confidence after "
                     f"{statistics.fmean(rest):.4g} (min {min(rest):.4g}, max {max(rest):.4g}), "
                     f"mean AGAR {statistics.fmean(r['casmo_agar'] for r in rows):.4g}")
    if after:
        mean = statistics.fmean(after)
        peak = max(r.get("lr", 0.0) for r in trace)
        lines.append(f"mean confidence after calibration: {mean:.4g} over {len(after)} steps; matched AdamW: "
                     f"peak lr {peak:.4g} * {mean:.4g} = {peak * mean:.4g}")
    return lines


def plot(trace: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    steps = [r["global_step"] for r in trace]
    ax.plot(steps, [r["casmo_confidence"] for r in trace], label="confidence", lw=1.5)
    ax.plot(steps, [r["casmo_agar"] for r in trace], label="AGAR", lw=1, alpha=0.7)
    cal = [r["global_step"] for r in trace if r["casmo_calibrating"]]
    ax.scatter(cal, [1.02] * len(cal), s=4, color="grey", label="calibrating (plain AdamW)")
    for i, r in enumerate(trace):
        if i and r["period"] != trace[i - 1]["period"]:
            ax.axvline(r["global_step"] - 0.5, color="k", ls="--", lw=0.8)
            ax.text(r["global_step"], 1.06, f"p{r['period']}", fontsize=8)
    if trace:
        ax.text(trace[0]["global_step"], 1.06, f"p{trace[0]['period']}", fontsize=8)
    ax.set_xlabel("global optimizer step")
    ax.set_ylim(0, 1.12)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("CASMO confidence (dashed: period boundaries)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="write the plot here (PNG)")
    args = parser.parse_args(argv)
    if not RunDir(args.run_dir).train_log.is_file():
        print(f"error: {args.run_dir}/train_log.jsonl not found", file=sys.stderr)
        return 2
    trace = load_trace(args.run_dir)
    if not trace:
        print(f"error: {args.run_dir} has no CASMO step records (was it run with train.optimizer=casmo?)",
              file=sys.stderr)
        return 2
    print("\n".join(summarize(trace)))
    if args.out:
        plot(trace, args.out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
