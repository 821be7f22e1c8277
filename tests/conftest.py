"""Shared helpers: run main.py as a real process on a small synthetic benchmark."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as main.py does, before any test imports torch

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# Small enough for seconds per run, large enough for several optimizer steps per period.
SMALL = ["--mode", "synthetic", "--set", "data.num_facts=12", "--set", "train.epochs=4",
         "--set", "train.max_batch_size=4", "--set", "train.progress=false"]


def main_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), *args]


def slow_steps(seconds: float) -> dict[str, str]:
    """The environment that makes main.py sleep `seconds` after each optimizer step (training/config.py
    STEP_SLEEP_ENV): time for a test to signal or kill a run mid-period. No config field, so no run id changes."""
    from training.config import STEP_SLEEP_ENV

    return {STEP_SLEEP_ENV: str(seconds)}


def run_main(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(main_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def only_run_dir(run_root: Path) -> Path:
    dirs = [d for d in run_root.iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def comparable(results: dict) -> dict:
    """What must be identical between an interrupted and an uninterrupted run."""
    return {k: results[k] for k in ("metrics", "final_state_sha256", "method_extras", "data_fingerprint",
                                    "config_hash")}


def train_records(run_dir: Path) -> list[dict]:
    """The logged optimizer steps of a run, minus their wall time: what a resumed run must repeat exactly."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if r.get("event") == "train"]


def log_rows(run_dir: Path) -> list[dict]:
    """train_log.jsonl of a run that may still be writing it: [] before it exists, and a last line
    being written right now is left out."""
    path = run_dir / "train_log.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="session")
def reference_lora(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted small lora run, shared by the resume tests."""
    root = tmp_path_factory.mktemp("reference")
    proc = run_main(*SMALL, "--method", "lora", "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(root)
    return {**read_results(run_dir), "run_dir": str(run_dir)}


# A two-task stream of generated multiple-choice items: the smallest stream run (about 10 s).
TINY_STREAM = """name: tiny-stream
tasks:
  - name: mca
    source: {type: generated, domain: multiple_choice, num_train: 8, num_eval: 4}
    scorer: multiple_choice
    train_split: train
    eval_split: test
  - name: mcb
    source: {type: generated, domain: multiple_choice, num_train: 8, num_eval: 4, seed: 1}
    scorer: multiple_choice
    train_split: train
    eval_split: test
"""


def tiny_stream_runs(root: Path, methods: str) -> dict[str, Path]:
    """Train `methods` (comma separated) on TINY_STREAM, one epoch; {method: run dir}."""
    stream = root / "tiny-stream.yaml"
    stream.write_text(TINY_STREAM)
    proc = run_main("--mode", "synthetic", "--stream", str(stream), "--method", methods, "--set", "train.epochs=1",
                    "--set", "train.progress=false", "--run-root", str(root / "runs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {yaml.safe_load((run / "config.yaml").read_text())["method"]["name"]: run
            for run in sorted((root / "runs").iterdir()) if run.is_dir()}


def signal_after_steps(monkeypatch: pytest.MonkeyPatch, steps: int) -> Callable[[], None]:
    """Make the training step send this process SIGUSR2 right after its `steps`-th call, so an in-process
    cli.main stops at that step boundary with exit 75; returns the function that puts the real step back."""
    import signal

    from training import trainer

    real_step = trainer.Trainer.train_step
    count = {"n": 0}

    def step_then_signal(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == steps:
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_signal)
    return lambda: monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
