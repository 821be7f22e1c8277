"""Tests of artifacts/: atomic writes, manifests, the run lock and step checkpoints.

The crash tests use real child processes killed with SIGKILL, because what matters is what the
kernel and the file system leave behind, not what Python cleanup code would do.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

import artifacts.atomic as atomic_mod
from artifacts import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    LockHeldError,
    RunLock,
    StepCheckpoints,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    cleanup_stale_tmp,
    commit_dir,
    live_holder,
    read_holder,
    read_manifest,
    sha256_bytes,
    sha256_file,
    slurm_job_id,
    staging_dir,
    verify_manifest,
    write_manifest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tmp_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".tmp-"))


def _spawn(code: str, env_extra: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a Python child that can import the repo's packages."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"child never created {path}")
        time.sleep(0.01)


def _kill9(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL


# --- atomic writes -------------------------------------------------------------------------------


def test_atomic_write_round_trip(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01\x02")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01\x02"
    atomic_write_bytes(tmp_path / "a.bin", b"replaced")
    assert (tmp_path / "a.bin").read_bytes() == b"replaced"

    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"

    atomic_write_json(tmp_path / "o.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "o.json").read_text()
    assert text == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    assert json.loads(text) == {"a": [1, 2], "b": 1}

    # The temp file's 0600 must not leak into results that a group shares.
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert _tmp_entries(tmp_path) == []


def test_atomic_write_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "config.yaml"
    atomic_write_text(target, "old: 1\n")

    def boom(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(atomic_mod.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write_text(target, "new: 2\n")
    assert target.read_text() == "old: 1\n"
    assert _tmp_entries(tmp_path) == []


def test_sha256_helpers(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # crosses the chunk boundary
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == sha256_bytes(data)


def test_commit_dir_replaces_existing_dir(tmp_path: Path) -> None:
    final = tmp_path / "periods" / "1-p1"
    final.mkdir(parents=True)
    (final / "stale.txt").write_text("stale")

    tmp = staging_dir(final)
    assert tmp.parent == final.parent and tmp.name.startswith(f".tmp-{final.name}-{os.getpid()}-")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "new.txt").write_text("new")
    commit_dir(tmp, final)

    assert not tmp.exists()
    assert sorted(p.relative_to(final).as_posix() for p in final.rglob("*")) == ["sub", "sub/new.txt"]
    assert _tmp_entries(final.parent) == []

    # Committing to a name that does not exist yet works the same way.
    tmp2 = staging_dir(tmp_path / "fresh")
    (tmp2 / "x").write_text("x")
    commit_dir(tmp2, tmp_path / "fresh")
    assert (tmp_path / "fresh" / "x").read_text() == "x"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to map fds to paths")
def test_commit_dir_fsyncs_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Lesson from public projects: renamed-but-never-fsynced checkpoints. Check every file, every
    # directory and the parent (which records the rename) are flushed.
    synced: set[str] = set()
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    final = tmp_path / "ckpt"
    tmp = staging_dir(final)
    (tmp / "d").mkdir()
    (tmp / "a.bin").write_bytes(b"a")
    (tmp / "d" / "b.bin").write_bytes(b"b")
    monkeypatch.setattr(atomic_mod.os, "fsync", recording_fsync)
    commit_dir(tmp, final)
    for p in [tmp / "a.bin", tmp / "d" / "b.bin", tmp / "d", tmp, tmp_path]:
        assert str(p) in synced, f"{p} was not fsynced"


def test_cleanup_stale_tmp(tmp_path: Path) -> None:
    (tmp_path / ".tmp-step-000003-123-abc").mkdir()
    (tmp_path / ".tmp-step-000003-123-abc" / "model.bin").write_bytes(b"partial")
    (tmp_path / ".tmp-run.json-123-xyz").write_text("{")
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "keep.txt").write_text("k")
    removed = cleanup_stale_tmp(tmp_path)
    assert sorted(p.name for p in removed) == [".tmp-run.json-123-xyz", ".tmp-step-000003-123-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "step-000002"]
    assert cleanup_stale_tmp(tmp_path / "missing") == []


# --- manifests -----------------------------------------------------------------------------------


def _populate(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "trainable.safetensors").write_bytes(os.urandom(4096))
    (d / "eval").mkdir(exist_ok=True)
    (d / "eval" / "scores.json").write_text('{"em": 0.5}\n')
    # An in-flight temp dir of some other writer is not part of the commit.
    (d / ".tmp-eval2-1-x").mkdir(exist_ok=True)
    (d / ".tmp-eval2-1-x" / "half.jsonl").write_text("{")


def test_manifest_round_trip(tmp_path: Path) -> None:
    d = tmp_path / "period"
    _populate(d)
    m = write_manifest(d, {"period": "1-p1", "method": "lora"})

    assert set(m["files"]) == {"trainable.safetensors", "eval/scores.json"}
    entry = m["files"]["trainable.safetensors"]
    assert entry == {"sha256": sha256_file(d / "trainable.safetensors"), "size": 4096}
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["period"] == "1-p1" and m["method"] == "lora"
    assert m["written_at"].endswith("+00:00")
    assert read_manifest(d) == m
    assert verify_manifest(d) == (True, "ok")

    # Files added after the commit (an eval job's own outputs) do not invalidate it.
    (d / "eval_extra").mkdir()
    (d / "eval_extra" / "manifest.json").write_text("{}")
    assert verify_manifest(d) == (True, "ok")


def test_verify_manifest_reports_a_file_that_vanishes_while_hashed(tmp_path: Path, monkeypatch) -> None:
    """A reader racing a writer's commit_dir (the dir renamed aside mid-hash) gets a reason, not an
    exception: the report's verify_stable then sees the dir changed and reads it again (the full
    suite once listed such a run as 'failed: FileNotFoundError')."""
    import artifacts.manifest as manifest_module

    d = tmp_path / "period"
    _populate(d)
    write_manifest(d, {"period": "1-p1", "method": "lora"})

    def vanished(path: object) -> str:
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(manifest_module, "sha256_file", vanished)
    ok, reason = verify_manifest(d)
    assert not ok and reason.startswith("unreadable file ") and "FileNotFoundError" in reason


def test_manifest_rejects_reserved_fields(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        write_manifest(tmp_path, {"files": {}})


def _flip_byte(d: Path) -> None:
    p = d / "trainable.safetensors"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(d: Path) -> None:
    p = d / "trainable.safetensors"
    p.write_bytes(p.read_bytes()[:1000])


def _delete(d: Path) -> None:
    (d / "eval" / "scores.json").unlink()


def _garbage_manifest(d: Path) -> None:
    (d / MANIFEST_NAME).write_bytes(b"\x00\x00{not json")


def _no_manifest(d: Path) -> None:
    (d / MANIFEST_NAME).unlink()


def _wrong_schema(d: Path) -> None:
    m = json.loads((d / MANIFEST_NAME).read_text())
    m["schema_version"] = 99
    (d / MANIFEST_NAME).write_text(json.dumps(m))


def _missing_schema(d: Path) -> None:
    m = json.loads((d / MANIFEST_NAME).read_text())
    del m["schema_version"]
    (d / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_flip_byte, "sha256 mismatch for trainable.safetensors"),
        (_truncate, "size mismatch for trainable.safetensors"),
        (_delete, "missing file eval/scores.json"),
        (_garbage_manifest, "unreadable manifest.json"),
        (_no_manifest, "missing manifest.json"),
        (_wrong_schema, "wrong schema_version 99"),
        (_missing_schema, "wrong schema_version None"),
    ],
)
def test_manifest_detects_tampering(tmp_path: Path, tamper, expected: str) -> None:
    _populate(tmp_path)
    write_manifest(tmp_path, {})
    tamper(tmp_path)
    ok, reason = verify_manifest(tmp_path)
    assert not ok
    assert reason.startswith(expected), reason


def test_read_manifest_none_when_absent_or_garbage(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("[1, 2")
    assert read_manifest(tmp_path) is None


# --- run lock ------------------------------------------------------------------------------------


def test_lock_held_by_other_process_then_freed_by_sigkill(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ready = tmp_path / "ready"
    child = _spawn(
        f"""
        import time
        from pathlib import Path
        from artifacts import RunLock
        lock = RunLock({str(run_dir)!r})
        lock.acquire()
        Path({str(ready)!r}).write_text("1")
        time.sleep(60)
        """,
        env_extra={"SLURM_JOB_ID": "999", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3"},
    )
    try:
        _wait_for(ready, child)
        with pytest.raises(LockHeldError) as info:
            RunLock(run_dir).acquire()
        msg = str(info.value)
        assert msg.startswith(f"run directory {run_dir} is locked by host={socket.gethostname()} ")
        assert f"pid={child.pid} " in msg
        assert "slurm_job_id=77_3 since " in msg
        assert msg.endswith("; wait for it or stop it")
        assert isinstance(info.value, RuntimeError)
        assert info.value.holder["pid"] == child.pid
        assert live_holder(run_dir)["pid"] == child.pid
    finally:
        _kill9(child)

    # The kernel dropped the flock with the process; no manual cleanup needed.
    assert live_holder(run_dir) is None
    with RunLock(run_dir) as lock:
        assert lock.held
        assert read_holder(run_dir)["pid"] == os.getpid()
    assert not lock.held
    assert (run_dir / ".lock").exists()  # never deleted: that would break flock exclusion


def test_lock_is_exclusive_within_one_process(tmp_path: Path) -> None:
    first = RunLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(LockHeldError, match=f"pid={os.getpid()} "):
            RunLock(tmp_path).acquire()
        with pytest.raises(RuntimeError, match="already held"):
            first.acquire()
    finally:
        first.release()
    first.release()  # idempotent
    with RunLock(tmp_path):
        pass


def test_slurm_job_id_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    assert slurm_job_id() == "12345"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12000")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert slurm_job_id() == "12000_4"


# --- step checkpoints ----------------------------------------------------------------------------


def _writer(payload: bytes):
    def write_fn(d: Path) -> None:
        (d / "model.bin").write_bytes(payload)
        (d / "state").mkdir()
        (d / "state" / "rng.json").write_text('{"seed": 1}')

    return write_fn


def test_step_checkpoints_save_and_prune(tmp_path: Path) -> None:
    ck = StepCheckpoints(tmp_path / "checkpoints" / "1-p1", keep=2)
    assert ck.latest_valid() is None and ck.list_steps() == []
    for step in (10, 20, 30, 40):
        path = ck.save(step, _writer(f"weights@{step}".encode()), {"period": "1-p1"})
        assert path.name == f"step-{step:06d}"
    assert [s for s, _ in ck.list_steps()] == [30, 40]
    step, path = ck.latest_valid()
    assert step == 40 and (path / "model.bin").read_bytes() == b"weights@40"
    m = read_manifest(path)
    assert m["step"] == 40 and m["period"] == "1-p1"
    assert set(m["files"]) == {"model.bin", "state/rng.json"}
    assert _tmp_entries(ck.root) == []


def test_step_checkpoints_fall_back_when_newest_is_corrupt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = StepCheckpoints(tmp_path, keep=2)
    ck.save(1, _writer(b"a" * 1000), {})
    ck.save(2, _writer(b"b" * 1000), {})
    (ck.path_for(2) / "model.bin").write_bytes(b"b" * 999 + b"X")  # same size, different bytes

    with caplog.at_level(logging.WARNING), pytest.warns(RuntimeWarning) as record:
        assert ck.latest_valid() == (1, ck.path_for(1))
    expected = (
        f"checkpoint {ck.path_for(2)} is invalid (sha256 mismatch for model.bin); "
        "falling back to step 1"
    )
    assert [str(w.message) for w in record] == [expected]
    assert expected in caplog.text

    # Pruning keeps the newest VALID ones: the corrupt step 2 goes, the good step 1 stays.
    ck.save(3, _writer(b"c"), {})
    assert [s for s, _ in ck.list_steps()] == [1, 3]


def test_step_checkpoints_none_valid_warns(tmp_path: Path) -> None:
    ck = StepCheckpoints(tmp_path)
    ck.save(5, _writer(b"x"), {})
    (ck.path_for(5) / MANIFEST_NAME).unlink()
    with pytest.warns(RuntimeWarning, match=r"missing manifest\.json\); no valid checkpoint left"):
        assert ck.latest_valid() is None


def test_step_checkpoints_ignore_half_written_tmp_dir(tmp_path: Path) -> None:
    ck = StepCheckpoints(tmp_path)
    ck.save(2, _writer(b"good"), {})
    half = tmp_path / ".tmp-step-000003-4242-abcd"
    half.mkdir()
    (half / "model.bin").write_bytes(b"half")
    (half / MANIFEST_NAME).write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ignoring it must be silent
        assert ck.latest_valid() == (2, ck.path_for(2))
    assert [s for s, _ in ck.list_steps()] == [2]


def test_step_checkpoints_failed_write_fn_leaves_previous(tmp_path: Path) -> None:
    ck = StepCheckpoints(tmp_path)
    ck.save(1, _writer(b"good"), {})

    def failing(d: Path) -> None:
        (d / "model.bin").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ck.save(2, failing, {})
    assert ck.latest_valid() == (1, ck.path_for(1))
    assert _tmp_entries(tmp_path) == []


def test_step_checkpoints_resave_same_step_and_clear(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints" / "2-p2"
    ck = StepCheckpoints(root)
    ck.save(7, _writer(b"first"), {})
    ck.save(7, _writer(b"second"), {})
    assert ck.latest_valid() == (7, ck.path_for(7))
    assert (ck.path_for(7) / "model.bin").read_bytes() == b"second"
    ck.clear()
    assert not root.exists()
    assert _tmp_entries(root.parent) == []
    assert ck.latest_valid() is None
    ck.clear()  # idempotent


def test_step_checkpoints_rejects_bad_args(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep"):
        StepCheckpoints(tmp_path, keep=0)
    with pytest.raises(ValueError, match="step"):
        StepCheckpoints(tmp_path).save(-1, _writer(b""), {})


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints" / "1-p1"
    ck = StepCheckpoints(root)
    ck.save(1, _writer(b"one"), {})
    ck.save(2, _writer(b"two"), {})
    started = tmp_path / "writing"
    child = _spawn(
        f"""
        import time
        from pathlib import Path
        from artifacts import StepCheckpoints

        def slow_write(d):
            with open(d / "model.bin", "wb") as f:
                for i in range(10_000):
                    f.write(b"\\x01" * (1 << 16))
                    f.flush()
                    if i == 4:
                        Path({str(started)!r}).write_text("1")
                    time.sleep(0.01)

        StepCheckpoints({str(root)!r}).save(3, slow_write, {{}})
        """
    )
    try:
        _wait_for(started, child)
    finally:
        _kill9(child)

    leftovers = _tmp_entries(root)
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-000003-")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert StepCheckpoints(root).latest_valid() == (2, ck.path_for(2))
    # The next writer (holding the lock) clears the debris and carries on.
    assert [p.name for p in cleanup_stale_tmp(root)] == leftovers
    StepCheckpoints(root).save(3, _writer(b"three"), {})
    assert [s for s, _ in StepCheckpoints(root).list_steps()] == [2, 3]


def test_the_bounded_read_stops_past_its_bound(tmp_path) -> None:
    """read_fd_bounded (shared by the run readers and the user-file reader): a file that is larger than
    the bound by the time it is read (it grew after its size was checked) gives None, never its bytes."""
    import os

    from artifacts.atomic import read_fd_bounded

    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    for bound, expected in ((10, b"0123456789"), (9, None), (100, b"0123456789")):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert read_fd_bounded(fd, bound) == expected
        finally:
            os.close(fd)
