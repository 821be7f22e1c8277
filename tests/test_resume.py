"""Never losing work: kills, signals and corrupt checkpoints end with the uninterrupted run's numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from artifacts import verify_manifest
from tests.conftest import REPO, SMALL, comparable, main_cmd, only_run_dir, read_results, run_main, slow_steps

pytestmark = pytest.mark.slow

SLOW_STEPS = ["--set", "checkpoint.every_steps=1"]
SLOW = slow_steps(0.05)


def _train_records(run_dir: Path) -> list[dict]:
    log = run_dir / "train_log.jsonl"
    if not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def reference_run_dir(results: dict) -> Path:
    return Path(results["run_dir"])


def _start(root: Path) -> subprocess.Popen:
    return subprocess.Popen(main_cmd(*SMALL, *SLOW_STEPS, "--method", "lora", "--run-root", str(root)),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **SLOW})


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting")


def _steps_in(root: Path, period: int) -> int:
    dirs = [d for d in root.iterdir() if d.is_dir()] if root.exists() else []
    if not dirs:
        return 0
    return sum(1 for r in _train_records(dirs[0]) if r.get("event") == "train" and r.get("period") == period)


def test_sigkill_mid_period_and_corrupt_newest_checkpoint_resume_equals_uninterrupted(tmp_path, reference_lora):
    root = tmp_path / "runs"
    # 1) killed in the middle of period 1 (checkpoints every step, so writes are often in flight)
    proc = _start(root)
    _wait_for(lambda: _steps_in(root, 1) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = only_run_dir(root)
    assert not (run_dir / "periods" / "1-2018").exists()
    # 2) the newest step checkpoint is corrupted (a torn write the kernel reported as done)
    ckpt_root = run_dir / "checkpoints" / "1-2018"
    steps = sorted(p for p in ckpt_root.iterdir() if p.name.startswith("step-"))
    assert steps, "a step checkpoint must exist after several steps"
    newest = steps[-1] / "trainable.safetensors"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF
    newest.write_bytes(bytes(data))
    # 3) killed again, in period 2 this time
    proc = _start(root)
    _wait_for(lambda: _steps_in(root, 2) >= 2, proc)
    stderr_so_far = ""
    proc.send_signal(signal.SIGKILL)
    _, stderr_so_far = proc.communicate()
    assert "falling back to step" in stderr_so_far, stderr_so_far[-2000:]
    assert "resuming from step checkpoint" in stderr_so_far
    # 4) the plain rerun finishes
    proc = run_main(*SMALL, *SLOW_STEPS, "--method", "lora", "--run-root", str(root), env=SLOW)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert comparable(read_results(run_dir)) == comparable(reference_lora)
    # the log holds each step exactly once despite the replays
    train = [(r["period"], r["step"]) for r in _train_records(run_dir) if r["event"] == "train"]
    assert len(train) == len(set(train))
    for period in (1, 2, 3, 4):  # every step logged exactly once: nothing lost, nothing repeated
        steps = sorted(s for p, s in train if p == period)
        assert steps == list(range(1, len(steps) + 1)) and steps, (period, steps)
    reference_log = [(r["period"], r["step"], r["loss"]) for r in _train_records(reference_run_dir(reference_lora))
                     if r["event"] == "train"]
    assert sorted((r["period"], r["step"], r["loss"]) for r in _train_records(run_dir)
                  if r["event"] == "train") == sorted(reference_log), "the same losses, step for step"
    for period_dir in (run_dir / "periods").iterdir():
        assert verify_manifest(period_dir) == (True, "ok")
    assert not any((run_dir / "checkpoints").glob("*/step-*")), "committed periods drop their step checkpoints"


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_signal_saves_exits_75_and_resumes_from_the_step(tmp_path, reference_lora, sig):
    root = tmp_path / "runs"
    # no periodic checkpoints: the signal must cause one
    proc = subprocess.Popen(main_cmd(*SMALL, "--method", "lora", "--run-root", str(root)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **SLOW})
    _wait_for(lambda: _steps_in(root, 1) >= 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-2000:]
    run_dir = only_run_dir(root)
    steps = list((run_dir / "checkpoints" / "1-2018").glob("step-*"))
    assert len(steps) == 1
    saved_step = int(steps[0].name.split("-")[1])
    assert saved_step >= 3
    proc = run_main(*SMALL, "--method", "lora", "--run-root", str(root), env=SLOW)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from step checkpoint {saved_step}/" in proc.stderr
    assert comparable(read_results(run_dir)) == comparable(reference_lora)


def test_interrupted_evaluation_redoes_the_eval_not_the_training(tmp_path, reference_lora, monkeypatch):
    """Evaluation is part of finishing a period: a crash in it must not mark the period done."""
    from training import cli, workload

    calls = {"n": 0}
    real = workload.evaluate_probes

    def crash_on_second_eval(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the eval after period 1 (the first is the base row)
            raise KeyboardInterrupt("simulated kill during eval")
        return real(*args, **kwargs)

    root = tmp_path / "runs"
    argv = [*SMALL, "--method", "lora", "--run-root", str(root)]
    monkeypatch.setattr(workload, "evaluate_probes", crash_on_second_eval)
    # an abort (what a second Ctrl-C raises) mid-eval: exit 130, the period is not marked done
    assert cli.main(argv) == 130
    run_dir = only_run_dir(root)
    assert (run_dir / "periods" / "0-base" / "manifest.json").exists()
    assert not (run_dir / "periods" / "1-2018").exists()
    assert list((run_dir / "checkpoints" / "1-2018").glob("step-*")), "the end-of-training checkpoint exists"
    monkeypatch.setattr(workload, "evaluate_probes", real)
    assert cli.main(argv) == 0
    train = [r for r in _train_records(run_dir) if r["event"] == "train" and r["period"] == 1]
    assert len(train) == len({r["step"] for r in train})
    assert comparable(read_results(run_dir)) == comparable(reference_lora)


def test_resume_with_a_different_config_is_refused_with_the_differing_fields(tmp_path):
    root = tmp_path / "runs"
    proc = run_main(*SMALL, "--method", "lora", "--run-root", str(root), "--run-id", "fixed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_main(*SMALL, "--method", "lora", "--run-root", str(root), "--run-id", "fixed",
                    "--set", "train.lr=0.5", "--set", "method.lora.r=4")
    assert proc.returncode == 2
    assert "differing fields" in proc.stderr and "train.lr" in proc.stderr and "method.lora.r" in proc.stderr


def test_signal_during_startup_imports_still_exits_75(tmp_path):
    """The flag is installed before torch is imported: an early USR2 must not kill the process."""
    root = tmp_path / "runs"
    proc = subprocess.Popen(main_cmd(*SMALL, "--method", "lora", "--run-root", str(root)), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # well inside the imports (several seconds)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    proc = run_main(*SMALL, "--method", "lora", "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
