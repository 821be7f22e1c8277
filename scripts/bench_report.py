"""Time the report over many run directories.

    uv run python scripts/bench_report.py [--runs 100] [--source RUN_ROOT] [--workdir DIR]

Without --source it trains a tiny synthetic sweep (full_ft and lora, one seed) first. The source runs
are copied until there are --runs run directories, each copy with its own seed in config.yaml, so
the report sees a few groups of many seeds, like a real sweep; then the report CLI is run in a
subprocess and its wall time (Python start and imports included) is printed. Every file of every
run is checksummed, so the time grows with the size of the checkpoints (full_ft of a real model is
dominated by sha256 over the weights; see docs/reports.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TRAIN_SETS = ["train.epochs=2", "data.num_facts=8", "train.progress=false", "model.synthetic_hidden_size=32",
              "model.synthetic_layers=1", "train.threads=1", "checkpoint.every_seconds=0"]


def train_source(root: Path) -> None:
    sys.path.insert(0, str(REPO))
    from training.cli import main as train_main

    argv = ["--mode", "synthetic", "--method", "full_ft,lora", "--seed", "0", "--run-root", str(root)]
    for item in TRAIN_SETS:
        argv += ["--set", item]
    if train_main(argv) != 0:
        raise SystemExit("training the source sweep failed")


def replicate(source: Path, dest: Path, num_runs: int) -> int:
    runs = sorted(p for p in source.iterdir() if (p / "config.yaml").is_file())
    if not runs:
        raise SystemExit(f"no run directories in {source}")
    dest.mkdir(parents=True, exist_ok=True)
    total_bytes = 0
    for i in range(num_runs):
        src = runs[i % len(runs)]
        dst = dest / f"{src.name}-copy{i:04d}"
        shutil.copytree(src, dst)
        cfg = yaml.safe_load((dst / "config.yaml").read_text())
        cfg["seed"] = 1000 + i // len(runs)
        (dst / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        total_bytes += sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    return total_bytes


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--source", help="run root to copy runs from (default: train a tiny sweep)")
    p.add_argument("--workdir", help="where to build the runs (default: a temp dir, removed afterwards)")
    args = p.parse_args()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-report-"))
    try:
        source = Path(args.source) if args.source else work / "source"
        if not args.source:
            train_source(source)
        num_bytes = replicate(source, work / "runs", args.runs)
        cmd = [sys.executable, "-m", "eval_and_metrics.report", str(work / "runs"), "--out", str(work / "report")]
        started = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - started
        print(done.stdout.splitlines()[0] if done.stdout else done.stderr[-2000:])
        print(f"{args.runs} runs ({num_bytes / 1e6:.1f} MB of run files): report CLI wall time {elapsed:.1f} s")
        return done.returncode
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
