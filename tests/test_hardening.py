"""Failure classes a user meets, each with its exit code and one line, never a traceback, and a rerun that
ends with the same numbers as an uninterrupted run: signals at any instant (startup included), Ctrl-C
twice, a full disk, planted pickles and symbolic links in a run directory, and a quiet console.

The reference is the session's uninterrupted small lora run (tests/conftest.py, reference_lora).
"""

from __future__ import annotations

import collections
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from artifacts import UnsafePathError, UnsafeStateError, read_manifest, verify_manifest, write_manifest
from tests.conftest import REPO, SMALL, comparable, main_cmd, only_run_dir, read_results, run_main, slow_steps
from training.signals import EXIT_ABORTED, EXIT_RESUME, EXIT_STORAGE, EXIT_UNTRUSTED

LORA = [*SMALL, "--method", "lora"]
# Slower steps stretch training over a few seconds so random instants land in it too; the step sleep is not
# part of a run's identity, so the rerun without it must match the reference exactly.
SLOW = {**os.environ, **slow_steps(0.04)}


def _no_traceback(proc_err: str) -> None:
    assert "Traceback" not in proc_err, proc_err[-3000:]


def _rerun_matches_reference(root: Path, reference: dict) -> None:
    proc = run_main(*LORA, "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _no_traceback(proc.stderr)
    assert comparable(read_results(only_run_dir(root))) == comparable(reference)


# ------------------------------------------------------------------------------------------------
# signals


@pytest.mark.slow
def test_each_signal_at_a_random_instant_of_the_whole_run_exits_cleanly_and_the_rerun_is_identical(
        tmp_path: Path, reference_lora: dict):
    # One instant per signal, drawn from windows that cover the process's life: importing torch,
    # building the data and the model, the base eval and training. Seeded and printed, so a failure
    # can be replayed.
    seed = int(os.environ.get("CLKIT_SIGNAL_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    windows = [(0.05, 1.5), (1.5, 6.0), (6.0, 9.0), (9.0, 14.0)]
    signals = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2]
    rng.shuffle(signals)
    outcomes = collections.Counter()
    for i, (sig, (lo, hi)) in enumerate(zip(signals, windows)):
        instant = rng.uniform(lo, hi)
        root = tmp_path / f"case{i}"
        proc = subprocess.Popen(main_cmd(*LORA, "--run-root", str(root)), cwd=REPO, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SLOW)
        time.sleep(instant)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
        where = f"seed={seed} signal={sig.name} at {instant:.2f}s"
        assert proc.returncode in (0, EXIT_RESUME), f"{where}: exit {proc.returncode}\n{err[-3000:]}"
        _no_traceback(err)
        if proc.returncode == EXIT_RESUME:
            assert "stopped: " in err and "run the same command again" in err, f"{where}\n{err[-2000:]}"
        outcomes[proc.returncode] += 1
        if root.exists():  # a stop during startup writes nothing at all
            _rerun_matches_reference(root, reference_lora)
    assert outcomes[EXIT_RESUME] >= 2, f"seed={seed}: the signals mostly missed the run: {outcomes}"


@pytest.mark.slow
def test_ctrl_c_twice_aborts_with_130_and_the_rerun_is_identical(tmp_path: Path, reference_lora: dict):
    root = tmp_path / "runs"
    proc = subprocess.Popen(main_cmd(*LORA, "--run-root", str(root)), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **slow_steps(0.2)})
    deadline = time.time() + 90
    while not list(root.glob("*/periods/0-base/manifest.json")):  # training of period 1 has begun
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_ABORTED, err[-3000:]
    _no_traceback(err)
    assert "press Ctrl-C again to abort" in err and "aborted by a second Ctrl-C" in err
    _rerun_matches_reference(root, reference_lora)


# ------------------------------------------------------------------------------------------------
# a full disk


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        # CI runs as root and must run the disk-full and read-only tests: there a failed mount is a failure
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but a small tmpfs cannot be mounted (run as root): {exc}", pytrace=False)
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {exc}")


@pytest.mark.slow
def test_full_disk_exits_74_in_one_line_and_the_rerun_after_freeing_space_is_identical(
        tmp_path: Path, reference_lora: dict):
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "450k")  # room for the data, the base row and part of period 1
    try:
        root = disk / "runs"
        proc = run_main(*LORA, "--set", "checkpoint.check_free_space=false", "--run-root", str(root))
        assert proc.returncode == EXIT_STORAGE, proc.stderr[-3000:]
        _no_traceback(proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, proc.stderr
        assert "No space left on device" in errors[0] and "needed " in errors[0] and "free" in errors[0]
        assert "the last committed period is 0-base and stays intact" in errors[0]
        run_dir = only_run_dir(root)
        assert verify_manifest(run_dir / "periods" / "0-base") == (True, "ok")
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True, timeout=30)
        _rerun_matches_reference(root, reference_lora)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def test_too_little_free_space_refuses_the_period_before_training(tmp_path: Path, capsys, monkeypatch):
    from training import checkpointer, cli

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(checkpointer.shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 1000, 1000))
    root = tmp_path / "runs"
    code = cli.main([*LORA, "--run-root", str(root)])
    err = capsys.readouterr().err
    assert code == EXIT_STORAGE, err
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert "not enough free space to start period 1" in line and "checkpoint.keep=2" in line
    assert "the last committed period is 0-base" in line
    assert not list(only_run_dir(root).glob("checkpoints/*/step-*")), "no step was trained"


def test_unwritable_run_roots_exit_74_in_one_line_and_write_nothing(tmp_path: Path, capsys):
    from training import cli

    blocker = tmp_path / "file"
    blocker.write_text("a file where the run root's parent should be")
    readonly = tmp_path / "ro"
    _mount_tmpfs(readonly, "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(readonly)], check=True, timeout=30)
        for root in (blocker / "runs", readonly / "runs"):
            code = cli.main([*LORA, "--run-root", str(root)])
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("error: ")]
            assert code == EXIT_STORAGE and len(errors) == 1, err
            assert "nothing is committed yet" in errors[0] and "--run-root" in errors[0], errors[0]
        assert list(readonly.iterdir()) == [] and blocker.read_text().startswith("a file")
    finally:
        subprocess.run(["umount", "-l", str(readonly)], capture_output=True, timeout=30)


# ------------------------------------------------------------------------------------------------
# untrusted run directories


class _Evil:
    """Unpickling this runs a shell command: what a hostile run directory on shared scratch could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(period_dir: Path, marker: Path) -> None:
    torch.save({"counts": _Evil(marker)}, period_dir / "method_state.pt")
    manifest = read_manifest(period_dir)
    assert manifest is not None
    fields = {k: v for k, v in manifest.items() if k not in ("schema_version", "written_at", "files")}
    write_manifest(period_dir, fields)  # an attacker can re-checksum as easily as we can
    assert verify_manifest(period_dir) == (True, "ok")


@pytest.mark.slow
def test_a_planted_pickle_is_refused_by_resume_and_every_job_and_nothing_runs(tmp_path: Path, reference_lora):
    root = tmp_path / "runs"
    shutil.copytree(Path(reference_lora["run_dir"]).parent, root)
    run_dir = only_run_dir(root)
    marker = tmp_path / "pwned"
    _plant_pickle(run_dir / "periods" / "4-2024", marker)

    # the training CLI resuming that run
    proc = run_main(*LORA, "--run-root", str(root))
    assert proc.returncode == EXIT_UNTRUSTED, proc.stderr[-3000:]
    _no_traceback(proc.stderr)
    line = next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
    assert "refusing to load" in line and "method_state.pt" in line and "nothing in it was executed" in line

    # the shared loader every eval job (landscape, lm-eval) goes through
    from training.restore import load_saved_state

    class Probe:
        name = "probe"

        def load_trainable_state_dict(self, model, state):
            pass

        def load_state_dict(self, state):
            raise AssertionError("must not be reached")

    with pytest.raises(UnsafeStateError):
        load_saved_state(Probe(), torch.nn.Linear(1, 1), run_dir / "periods" / "4-2024")  # type: ignore[arg-type]

    # the report reads JSON only, and must list the run rather than crash
    report = subprocess.run([sys.executable, "-m", "eval_and_metrics.report", str(root), "--out",
                             str(tmp_path / "report")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-3000:]
    assert not marker.exists(), "the planted pickle ran"


def test_symlinks_in_a_run_directory_are_never_followed(tmp_path: Path):
    from artifacts import RunLock

    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's file")
    committed = tmp_path / "period"
    committed.mkdir()
    (committed / "a.txt").write_text("ours")
    write_manifest(committed, {"kind": "test"})
    # replace a committed file by a link to a file of the same size and hash elsewhere
    (tmp_path / "twin.txt").write_text("ours")
    (committed / "a.txt").unlink()
    (committed / "a.txt").symlink_to(tmp_path / "twin.txt")
    ok, reason = verify_manifest(committed)
    assert not ok and "symbolic link" in reason
    with pytest.raises(UnsafePathError):
        write_manifest(committed, {"kind": "test"})

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".lock").symlink_to(outside)
    with pytest.raises(UnsafePathError):
        RunLock(run_dir).acquire()
    assert outside.read_text() == "someone else's file"


# ------------------------------------------------------------------------------------------------
# a quiet console


def test_the_console_shows_no_library_noise(reference_lora: dict, tmp_path: Path):
    # rerunning a finished run goes through every import and model build, then reprints the table
    root = tmp_path / "runs"
    shutil.copytree(Path(reference_lora["run_dir"]).parent, root)
    proc = run_main(*LORA, "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for noise in ("gemm_4bit", "pip install kernels", "Warning", "warnings.warn", "deprecated"):
        assert noise not in proc.stderr, proc.stderr


def test_a_stop_swallowed_before_training_still_stops_and_prints_no_traceback(capsys):
    """A signal whose StopRequested lands in a finaliser (__del__) is printed by Python as "Exception
    ignored" and dropped; the block must still stop at its end, and nothing may be printed."""
    import gc
    import signal as _signal

    from training.signals import StopFlag, StopRequested

    stop = StopFlag()

    class Finalised:
        def __del__(self):
            stop._handle(_signal.SIGTERM, None)  # the handler running inside a finaliser

    with pytest.raises(StopRequested):
        with stop.immediately():
            Finalised()
            gc.collect()
    assert "Traceback" not in capsys.readouterr().err
