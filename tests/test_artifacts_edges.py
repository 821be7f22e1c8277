"""artifacts/ at its edges: refused writes, bounded and link-refusing reads, lock holders that cannot be read,
malformed manifests and step names past six digits.

tests/test_artifacts.py covers the paths a run takes when all goes well and the crash windows; these are
the promises docs/design.md and the module docstrings make for the other cases, each one a test that fails
when the promise is broken. The mutation run of artifacts/ (docs/mutation.md) found them untested.
"""

from __future__ import annotations

import errno
import gc
import json
import os
import re
import stat
import threading
from pathlib import Path

import pytest

import artifacts.atomic as atomic_mod
from artifacts import (
    LOCK_NAME,
    MANIFEST_NAME,
    LockHeldError,
    RunLock,
    StepCheckpoints,
    StorageError,
    UnreadableFileError,
    UnsafePathError,
    append_text,
    atomic_write_bytes,
    cleanup_stale_tmp,
    commit_dir,
    inside,
    live_holder,
    read_holder,
    read_manifest,
    read_regular_bytes,
    read_regular_text,
    read_text_inside,
    remove_path,
    sha256_file,
    staging_dir,
    step_dir_name,
    utc_now_iso,
    verify_manifest,
    write_manifest,
)
from artifacts.atomic import storage_guard

UMASK = os.umask(0)
os.umask(UMASK)


def _a_file_as_parent(tmp_path: Path) -> Path:
    """A path whose parent is a regular file: every create below it fails with ENOTDIR, a storage errno
    (a run root below a file), and it needs no root-refusing permissions (the tests may run as root)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    return blocker / "out.json"


# --- refused writes ------------------------------------------------------------------------------


def test_a_write_the_storage_refuses_names_the_path_and_the_size(tmp_path: Path) -> None:
    target = _a_file_as_parent(tmp_path)
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(target, b"x" * 123)
    err = info.value
    assert err.errno == errno.ENOTDIR and err.strerror == os.strerror(errno.ENOTDIR)
    assert err.path == target and err.filename == str(target) and err.num_bytes == 123
    assert isinstance(err, OSError) and isinstance(err.__cause__, NotADirectoryError)


def test_a_full_disk_mid_write_is_a_storage_error_and_leaves_the_old_file(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "results.json"
    atomic_write_bytes(target, b"old")

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_mod.os, "fsync", full)
    with pytest.raises(StorageError) as info:
        atomic_write_bytes(target, "é".encode() * 5)
    assert info.value.errno == errno.ENOSPC and info.value.num_bytes == 10 and info.value.path == target
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the temp file went too


def test_a_bug_is_not_dressed_up_as_a_storage_error(tmp_path: Path) -> None:
    # ENOENT (the parent was never made) is the caller's bug, not the storage's: raised as it is
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "no-such-dir" / "f", b"x")
    with pytest.raises(FileNotFoundError):
        append_text(tmp_path / "no-such-dir" / "log", "x")
    # storage_guard returns for anything that is not a storage errno, and never wraps twice
    storage_guard(ValueError("not an OSError"), tmp_path)
    storage_guard(OSError(errno.ENOENT, "gone"), tmp_path)
    already = StorageError(OSError(errno.ENOSPC, "full"), tmp_path / "a", 5)
    storage_guard(already, tmp_path / "b")
    for code in sorted(atomic_mod.STORAGE_ERRNOS):
        with pytest.raises(StorageError) as info:
            storage_guard(OSError(code, os.strerror(code)), tmp_path / "f", 7)
        assert info.value.errno == code and info.value.path == tmp_path / "f" and info.value.num_bytes == 7


def test_a_storage_error_without_a_strerror_still_has_a_message(tmp_path: Path) -> None:
    bare = OSError("write failed")
    bare.errno = errno.EIO
    err = StorageError(bare, tmp_path / "f")
    assert err.strerror == "write failed" and err.num_bytes is None and err.path == tmp_path / "f"


def test_append_text_appends_utf8_and_a_refused_append_is_a_storage_error(tmp_path: Path) -> None:
    log = tmp_path / "train_log.jsonl"
    append_text(log, "a é\n")
    append_text(log, "b\n")
    assert log.read_bytes() == "a é\nb\n".encode()
    target = _a_file_as_parent(tmp_path)
    with pytest.raises(StorageError) as info:
        append_text(target, "héllo")
    assert info.value.errno == errno.ENOTDIR and info.value.path == target and info.value.num_bytes == 6


def test_staging_dir_makes_its_parents_with_a_shared_mode_and_a_refusal_is_a_storage_error(tmp_path: Path) -> None:
    final = tmp_path / "a" / "b" / "step-000001"
    first, second = staging_dir(final), staging_dir(final)
    assert first != second and first.parent == final.parent and first.is_dir()
    assert stat.S_IMODE(first.stat().st_mode) == 0o777 & ~UMASK  # not mkdtemp's 0700
    assert list(first.iterdir()) == []
    blocked = _a_file_as_parent(tmp_path) / "step-000001"
    with pytest.raises(StorageError) as info:
        staging_dir(blocked)
    assert info.value.errno == errno.ENOTDIR and info.value.path == blocked


def test_commit_dir_skips_a_link_in_the_tree_and_flushes_the_files_beside_it(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not ours")
    final = tmp_path / "ckpt"
    tmp = staging_dir(final)
    names = [f"f{i:02d}" for i in range(20)]
    for name in names:
        (tmp / name).write_bytes(name.encode())
    (tmp / "link").symlink_to(outside)
    monkeypatch.setattr(atomic_mod.os, "fsync", recording)
    commit_dir(tmp, final)
    for name in names:
        assert str(tmp / name) in synced, name
    assert str(outside) not in synced  # a link's target is not ours to flush


def test_commit_dir_from_another_directory_flushes_both_parents(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync_dir = atomic_mod.fsync_dir

    def recording(path: object) -> None:
        synced.append(str(path))
        real_fsync_dir(path)

    (tmp_path / "staging").mkdir()
    (tmp_path / "final").mkdir()
    tmp = staging_dir(tmp_path / "staging" / "x")
    (tmp / "f").write_text("f")
    monkeypatch.setattr(atomic_mod, "fsync_dir", recording)
    commit_dir(tmp, tmp_path / "final" / "x")
    assert str(tmp_path / "final") in synced and str(tmp_path / "staging") in synced
    assert (tmp_path / "final" / "x" / "f").read_text() == "f"


def test_remove_path_removes_a_link_never_its_target_and_a_missing_path_is_fine(tmp_path: Path) -> None:
    target = tmp_path / "theirs"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    remove_path(link)
    assert not link.is_symlink() and (target / "keep.txt").read_text() == "keep"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    remove_path(dangling)
    assert not dangling.is_symlink()
    remove_path(tmp_path / "never-there")
    (tmp_path / "f.txt").write_text("f")
    remove_path(tmp_path / "f.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]


def test_cleanup_flushes_the_directory_only_when_it_removed_something(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    monkeypatch.setattr(atomic_mod, "fsync_dir", lambda p: synced.append(str(p)))
    (tmp_path / "keep").write_text("k")
    assert cleanup_stale_tmp(tmp_path) == [] and synced == []
    (tmp_path / ".tmp-x-1-a").write_text("x")
    assert cleanup_stale_tmp(tmp_path) == [tmp_path / ".tmp-x-1-a"] and synced == [str(tmp_path)]
    (tmp_path / "plain-file").write_text("not a directory")
    assert cleanup_stale_tmp(tmp_path / "plain-file") == []


# --- reads inside a run directory ----------------------------------------------------------------


def test_inside_refuses_every_way_out_of_the_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    assert inside(run, "sub/a.txt") == run / "sub" / "a.txt"
    assert inside(str(run), "a.txt") == run / "a.txt"  # a str directory is a Path too
    for rel in ("", "/etc/passwd", "../x", "sub/../../x"):
        with pytest.raises(UnsafePathError, match=re.escape(f"{run}: {rel!r} is not a relative path inside")):
            inside(run, rel)
    (run / "out").symlink_to(tmp_path)
    with pytest.raises(UnsafePathError, match=re.escape(f"{run / 'out'} is a symbolic link; refusing to follow "
                                                        f"it out of {run}")):
        inside(run, "out/x.txt")
    (tmp_path / "run-link").symlink_to(run)
    with pytest.raises(UnsafePathError, match=re.escape(f"{tmp_path / 'run-link'} is a symbolic link; refusing")):
        inside(tmp_path / "run-link", "a.txt")


def test_read_text_inside_reads_the_file_and_never_a_link(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (run / "sub" / "config.yaml").write_bytes("lr: 0.1 # é\n".encode())
    assert read_text_inside(run, "sub/config.yaml") == "lr: 0.1 # é\n"
    assert read_text_inside(run, "sub/config.yaml", encoding="latin-1") == "lr: 0.1 # Ã©\n"
    (tmp_path / "theirs.yaml").write_text("secret: 1\n")
    (run / "config.yaml").symlink_to(tmp_path / "theirs.yaml")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        read_text_inside(run, "config.yaml")
    # a link planted between inside()'s check and the open: O_NOFOLLOW on the last component refuses it
    monkeypatch.setattr(atomic_mod, "inside", lambda directory, rel: Path(directory) / rel)
    with pytest.raises(OSError) as info:
        read_text_inside(run, "config.yaml")
    assert info.value.errno == errno.ELOOP
    monkeypatch.undo()
    with pytest.raises(UnsafePathError):
        read_text_inside(run, "../theirs.yaml")
    with pytest.raises(FileNotFoundError):
        read_text_inside(run, "missing.yaml")


def test_read_regular_bytes_refuses_what_is_not_a_small_regular_file(tmp_path: Path) -> None:
    f = tmp_path / "results.json"
    f.write_bytes(b"0123456789")
    assert read_regular_bytes(f) == b"0123456789"
    assert read_regular_bytes(f, max_bytes=10) == b"0123456789"
    with pytest.raises(UnreadableFileError, match=re.escape(f"{f}: 10 bytes, over the 9 bytes this file may have")):
        read_regular_bytes(f, max_bytes=9)
    with pytest.raises(UnreadableFileError, match=re.escape(f"{tmp_path}: is a directory, not a regular file")):
        read_regular_bytes(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFileError, match=re.escape(f"{fifo}: is a FIFO, not a regular file")):
        read_regular_bytes(fifo)  # returns at once: the open does not wait for a writer
    with pytest.raises(UnreadableFileError, match=re.escape("/dev/null: is a device or socket, not a regular")):
        read_regular_bytes("/dev/null")
    link = tmp_path / "link.json"
    link.symlink_to(f)
    assert read_regular_bytes(link) == b"0123456789"
    with pytest.raises(UnreadableFileError, match=re.escape(f"{link}: cannot read (a symbolic link, not followed)")):
        read_regular_bytes(link, follow_symlinks=False)
    with pytest.raises(FileNotFoundError):
        read_regular_bytes(tmp_path / "missing.json")
    below_a_file = f / "x"
    with pytest.raises(UnreadableFileError, match=re.escape(f"{below_a_file}: cannot read (Not a directory)")):
        read_regular_bytes(below_a_file)


def test_a_file_that_grows_past_its_bound_while_read_is_refused(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "grows.json"
    f.write_bytes(b"12345")
    # 5 bytes when its size is checked, past the bound by the time it is read (read_fd_bounded says so)
    monkeypatch.setattr(atomic_mod, "read_fd_bounded", lambda fd, n: None)
    with pytest.raises(UnreadableFileError, match=re.escape(f"{f}: over the 8 bytes this file may have")):
        read_regular_bytes(f, max_bytes=8)


def test_an_io_error_while_reading_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "bad.json"
    f.write_text("{}")

    def eio(fd: int, n: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic_mod, "read_fd_bounded", eio)
    with pytest.raises(UnreadableFileError, match=re.escape(f"{f}: cannot read (Input/output error)")) as info:
        read_regular_bytes(f)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_read_regular_text_names_the_byte_that_is_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "config.yaml"
    f.write_bytes("ok: é\n".encode() + b"\xff\n")
    with pytest.raises(UnreadableFileError, match=re.escape(f"{f}: not UTF-8 text (byte 7)")):
        read_regular_text(f)
    f.write_bytes("ok: é\n".encode())
    assert read_regular_text(f) == "ok: é\n"
    with pytest.raises(UnreadableFileError, match="over the 3 bytes"):
        read_regular_text(f, max_bytes=3)
    link = tmp_path / "l.yaml"
    link.symlink_to(f)
    with pytest.raises(UnreadableFileError, match="not followed"):
        read_regular_text(link, follow_symlinks=False)


# --- the run lock --------------------------------------------------------------------------------


def test_lock_held_message_when_the_holder_is_unknown(tmp_path: Path) -> None:
    err = LockHeldError(tmp_path, None)
    assert err.holder == {} and err.run_dir == tmp_path
    assert str(err) == (f"run directory {tmp_path} is locked by host=? pid=? slurm_job_id=? since ?; "
                        "wait for it or stop it")


def test_the_holder_record_is_the_acquirer_and_replaces_a_longer_old_one(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    run = tmp_path / "runs" / "new-run"  # made with its parents
    run.mkdir(parents=True)
    (run / LOCK_NAME).write_text(json.dumps({"host": "x" * 500, "pid": 1}))
    lock = RunLock(run)
    assert not lock.held
    holder = lock.acquire()
    try:
        assert lock.held
        assert set(holder) == {"host", "pid", "slurm_job_id", "started"}
        assert holder["pid"] == os.getpid() and holder["slurm_job_id"] == "4242"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", holder["started"])
        assert read_holder(run) == holder  # the old, longer record is gone (truncated, not overwritten in part)
        assert (run / LOCK_NAME).read_text() == json.dumps(holder, sort_keys=True) + "\n"
        assert live_holder(run) == holder
    finally:
        lock.close()  # close is release
    assert not lock.held and live_holder(run) is None


def test_the_lock_makes_its_run_directory_and_a_refused_one_is_a_storage_error(tmp_path: Path) -> None:
    with RunLock(tmp_path / "a" / "b" / "run") as lock:
        assert lock.path == tmp_path / "a" / "b" / "run" / LOCK_NAME and lock.path.is_file()
    blocked = _a_file_as_parent(tmp_path)
    with pytest.raises(StorageError) as info:
        RunLock(blocked).acquire()
    assert info.value.errno == errno.ENOTDIR and info.value.path == blocked


def test_a_lock_file_that_cannot_be_created_is_a_storage_error_naming_it(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def read_only(path, flags, *args):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *args)

    import artifacts.lock as lock_mod

    monkeypatch.setattr(lock_mod.os, "open", read_only)
    with pytest.raises(StorageError) as info:
        RunLock(tmp_path).acquire()
    assert info.value.errno == errno.EROFS and info.value.path == tmp_path / LOCK_NAME


def test_a_lock_briefly_shared_by_a_status_reader_is_still_acquired(tmp_path: Path) -> None:
    """live_holder (main.py status) takes a shared lock for an instant; a writer starting then retries."""
    import fcntl

    (tmp_path / LOCK_NAME).write_text("")
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    releaser = threading.Timer(0.06, lambda: (fcntl.flock(fd, fcntl.LOCK_UN), os.close(fd)))
    releaser.start()
    try:
        with RunLock(tmp_path) as lock:
            assert lock.held
    finally:
        releaser.join()


def test_a_lock_still_held_after_four_tries_is_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import artifacts.lock as lock_mod

    tries: list[int] = []
    sleeps: list[float] = []

    def busy(fd: int, op: int) -> None:
        tries.append(op)
        raise BlockingIOError(errno.EWOULDBLOCK, "busy")

    monkeypatch.setattr(lock_mod.fcntl, "flock", busy)
    monkeypatch.setattr(lock_mod.time, "sleep", sleeps.append)
    with pytest.raises(LockHeldError):
        RunLock(tmp_path).acquire()
    assert len(tries) == 4 and sleeps == [0.05, 0.05, 0.05]  # no sleep after the last try

    def broken(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", broken)
    with pytest.raises(OSError) as info:  # not a held lock: the file system cannot lock at all
        RunLock(tmp_path).acquire()
    assert info.value.errno == errno.ENOLCK and not isinstance(info.value, LockHeldError)


def test_a_lost_run_lock_releases_the_directory(tmp_path: Path) -> None:
    lost = RunLock(tmp_path)
    lost.acquire()
    del lost
    gc.collect()
    with RunLock(tmp_path) as lock:
        assert lock.held
    never = RunLock(tmp_path)
    never.__del__()  # never acquired: nothing to close, no error
    assert not never.held


def test_holder_records_that_are_not_a_holder(tmp_path: Path) -> None:
    assert read_holder(tmp_path) is None and live_holder(tmp_path) is None
    assert not (tmp_path / LOCK_NAME).exists()  # live_holder never creates the file
    for junk in (b"[1, 2]", b"{not json", b"\xff\xfe"):
        (tmp_path / LOCK_NAME).write_bytes(junk)
        assert read_holder(tmp_path) is None
    (tmp_path / LOCK_NAME).unlink()
    os.mkfifo(tmp_path / LOCK_NAME)
    assert read_holder(tmp_path) is None  # and does not block
    assert live_holder(tmp_path) is None
    (tmp_path / LOCK_NAME).unlink()
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    assert read_holder(tmp_path) is None
    with pytest.raises(UnsafePathError, match="is a symbolic link; refusing to follow it"):
        live_holder(tmp_path)


def test_a_live_holder_whose_record_is_unreadable_is_still_live(tmp_path: Path) -> None:
    import fcntl

    (tmp_path / LOCK_NAME).write_bytes(b"{torn")
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert live_holder(tmp_path) == {}  # held (not None) though nobody can say by whom
    finally:
        os.close(fd)
    assert live_holder(tmp_path) is None


# --- manifests -----------------------------------------------------------------------------------


def _committed(d: Path) -> dict:
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"a" * 10)
    (d / "sub" / "b.txt").write_text("b")
    (d / "sub" / MANIFEST_NAME).write_text("{}")  # a sub-manifest (an eval job's) is a file like any other
    (d / ".tmp-half").write_text("in flight")
    return write_manifest(d, {"kind": "t"}, written_at="2026-01-01T00:00:00+00:00")


def test_write_manifest_lists_every_file_but_its_own_and_in_flight_ones(tmp_path: Path) -> None:
    m = _committed(tmp_path)
    assert list(m["files"]) == ["a.bin", "sub/b.txt", "sub/manifest.json"]
    assert m["files"]["a.bin"] == {"sha256": sha256_file(tmp_path / "a.bin"), "size": 10}
    assert m["written_at"] == "2026-01-01T00:00:00+00:00" and m["kind"] == "t"
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == m
    (tmp_path / ".tmp-dir").mkdir()
    (tmp_path / ".tmp-dir" / "x").write_text("x")
    assert list(write_manifest(tmp_path, {})["files"]) == ["a.bin", "sub/b.txt", "sub/manifest.json"]
    (tmp_path / "linkdir").symlink_to(tmp_path / "sub")
    with pytest.raises(UnsafePathError, match=re.escape(f"{tmp_path / 'linkdir'} is a symbolic link")):
        write_manifest(tmp_path, {})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", utc_now_iso())


def _edit(d: Path, **changes) -> None:
    m = json.loads((d / MANIFEST_NAME).read_text())
    m.update(changes)
    (d / MANIFEST_NAME).write_text(json.dumps(m))


@pytest.mark.parametrize(("files", "expected"), [
    ("not a table", "malformed manifest.json: no 'files' table"),
    ({"a.bin": "x"}, "malformed manifest.json: bad entry for 'a.bin'"),
    ({"a.bin": {"sha256": "0" * 64}}, "malformed manifest.json: bad entry for 'a.bin'"),
    ({"a.bin": {"size": 10}}, "malformed manifest.json: bad entry for 'a.bin'"),
    ({"a.bin": {"size": "10", "sha256": "0" * 64}}, "malformed manifest.json: bad entry for 'a.bin'"),
    ({"": {"size": 1, "sha256": ""}}, "malformed manifest.json: bad entry for ''"),
    ({"/etc/passwd": {"size": 1, "sha256": ""}}, "malformed manifest.json: bad entry for '/etc/passwd'"),
    ({"sub/../../x": {"size": 1, "sha256": ""}}, "malformed manifest.json: bad entry for 'sub/../../x'"),
    ({"sub": {"size": 1, "sha256": ""}}, "missing file sub"),  # a directory is not a listed file
])
def test_a_malformed_manifest_is_reported_not_raised(tmp_path: Path, files, expected: str) -> None:
    _committed(tmp_path)
    _edit(tmp_path, files=files)
    assert verify_manifest(tmp_path) == (False, expected)


def test_the_cheap_checks_come_before_any_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import artifacts.manifest as manifest_mod

    _committed(tmp_path)
    (tmp_path / "sub" / "b.txt").unlink()  # sorted after a.bin, whose hash is never computed
    hashed: list[str] = []
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(str(p)) or "")
    assert verify_manifest(tmp_path) == (False, "missing file sub/b.txt")
    assert hashed == []
    (tmp_path / "sub" / "b.txt").write_text("bb")
    assert verify_manifest(tmp_path) == (False, "size mismatch for sub/b.txt: expected 1 bytes, found 2")


def test_manifests_that_are_not_objects_or_are_links(tmp_path: Path) -> None:
    _committed(tmp_path)
    good = (tmp_path / MANIFEST_NAME).read_text()
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    assert verify_manifest(tmp_path) == (False, "unreadable manifest.json: not a JSON object")
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{oops")
    ok, reason = verify_manifest(tmp_path)
    assert not ok and reason.startswith("unreadable manifest.json: invalid JSON (")
    (tmp_path / MANIFEST_NAME).unlink()
    (tmp_path / "elsewhere.json").write_text(good)
    (tmp_path / MANIFEST_NAME).symlink_to(tmp_path / "elsewhere.json")
    ok, reason = verify_manifest(tmp_path)
    assert not ok and reason.startswith(f"unsafe path: {tmp_path / MANIFEST_NAME} is a symbolic link")
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).unlink()
    os.mkfifo(tmp_path / MANIFEST_NAME)
    ok, reason = verify_manifest(tmp_path)
    assert not ok and reason.startswith("unreadable manifest.json: ") and "FIFO" in reason
    link = tmp_path.parent / f"{tmp_path.name}-link"
    link.symlink_to(tmp_path)
    ok, reason = verify_manifest(link)
    assert not ok and reason.startswith("unsafe path: ")
    assert verify_manifest(tmp_path / "a.bin")[0] is False  # a file where the directory should be


def test_a_listed_file_reached_through_a_link_is_unsafe(tmp_path: Path) -> None:
    _committed(tmp_path)
    (tmp_path / "sub" / "b.txt").unlink()
    (tmp_path / "sub").rename(tmp_path / "real-sub")
    (tmp_path / "sub").symlink_to(tmp_path / "real-sub")
    ok, reason = verify_manifest(tmp_path)
    assert not ok and reason.startswith(f"unsafe path: {tmp_path / 'sub'} is a symbolic link")


# --- step checkpoints ----------------------------------------------------------------------------


def _write(d: Path) -> None:
    (d / "model.bin").write_bytes(b"w")


def test_step_names_past_six_digits_sort_by_number(tmp_path: Path) -> None:
    assert step_dir_name(7) == "step-000007" and step_dir_name(1234567) == "step-1234567"
    ck = StepCheckpoints(tmp_path, keep=3)
    for step in (999999, 1000000, 0):
        ck.save(step, _write, {})
    (tmp_path / "step-000005").write_text("a file, not a checkpoint")
    (tmp_path / "step-12a").mkdir()
    (tmp_path / "xstep-000001").mkdir()
    (tmp_path / "step-000001-old").mkdir()
    assert ck.list_steps() == [(0, tmp_path / "step-000000"), (999999, tmp_path / "step-999999"),
                               (1000000, tmp_path / "step-1000000")]
    assert ck.latest_valid() == (1000000, tmp_path / "step-1000000")
    assert read_manifest(tmp_path / "step-000000")["step"] == 0
    assert StepCheckpoints(tmp_path / "missing").list_steps() == []


def test_keep_one_keeps_only_the_newest_and_a_fresh_process_prunes_what_is_corrupt(tmp_path: Path) -> None:
    ck = StepCheckpoints(tmp_path, keep=1)
    ck.save(1, _write, {"period": "p"})
    ck.save(2, _write, {"period": "p"})
    assert [s for s, _ in ck.list_steps()] == [2]
    m = read_manifest(ck.path_for(2))
    assert m["period"] == "p" and m["step"] == 2
    # a new process (empty cache) that finds the newest corrupt prunes it once its own save is in
    (ck.path_for(2) / "model.bin").write_bytes(b"X")
    fresh = StepCheckpoints(tmp_path, keep=2)
    fresh.save(3, _write, {})
    assert [s for s, _ in fresh.list_steps()] == [3]
    # a checkpoint verified once is not hashed again by later saves in the same process
    fresh.save(4, _write, {})
    assert [s for s, _ in fresh.list_steps()] == [3, 4]
    (fresh.path_for(3) / "model.bin").write_bytes(b"Y")  # behind the cache's back: still counted
    fresh.save(5, _write, {})
    assert [s for s, _ in fresh.list_steps()] == [4, 5]


def test_a_save_interrupted_after_the_write_leaves_no_staging_dir(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import artifacts.checkpoints as ck_mod

    ck = StepCheckpoints(tmp_path)

    def crash(tmp: Path, final: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ck_mod, "commit_dir", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save(1, _write, {})
    assert list(tmp_path.iterdir()) == []


def test_latest_valid_warns_once_per_corrupt_checkpoint_newest_first(tmp_path: Path) -> None:
    ck = StepCheckpoints(tmp_path, keep=3)
    for step in (1, 2, 3):
        ck.save(step, _write, {})
    (ck.path_for(3) / "model.bin").unlink()
    (ck.path_for(2) / MANIFEST_NAME).unlink()
    with pytest.warns(RuntimeWarning) as record:
        assert ck.latest_valid() == (1, ck.path_for(1))
    assert [str(w.message) for w in record] == [
        f"checkpoint {ck.path_for(3)} is invalid (missing file model.bin); falling back to step 1",
        f"checkpoint {ck.path_for(2)} is invalid (missing manifest.json); falling back to step 1"]
    # stacklevel=2: the warning points at the caller (the resume code), not at checkpoints.py's warn line
    assert not record[0].filename.endswith(os.path.join("artifacts", "checkpoints.py"))


def test_a_pruned_step_that_reappears_is_verified_again_not_trusted(tmp_path: Path) -> None:
    import shutil

    ck = StepCheckpoints(tmp_path, keep=1)
    ck.save(1, _write, {})
    ck.save(2, _write, {})  # prunes step 1, which must leave the cache with it
    shutil.copytree(ck.path_for(2), ck.path_for(1))  # someone else puts a corrupt step 1 back
    (ck.path_for(1) / "model.bin").write_bytes(b"X")
    ck.keep = 3
    ck.save(3, _write, {})
    assert [s for s, _ in ck.list_steps()] == [2, 3]


def test_each_checkpoint_is_hashed_at_most_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning after every save must not re-hash gigabytes of older checkpoints: what this object wrote, or
    verified once, is remembered (a new process, whose cache is empty, verifies again)."""
    import artifacts.checkpoints as ck_mod

    writer = StepCheckpoints(tmp_path, keep=2)
    writer.save(1, _write, {})
    writer.save(2, _write, {})
    verified: list[str] = []
    real_verify = ck_mod.verify_manifest

    def counting(path: Path) -> tuple[bool, str]:
        verified.append(path.name)
        return real_verify(path)

    monkeypatch.setattr(ck_mod, "verify_manifest", counting)
    for step in (3, 4, 5):
        writer.save(step, _write, {})
    assert verified == []  # every one it prunes against it wrote itself
    fresh = StepCheckpoints(tmp_path, keep=3)
    fresh.save(6, _write, {})
    fresh.save(7, _write, {})
    fresh.save(8, _write, {})
    assert sorted(verified) == ["step-000004", "step-000005"]  # once each, then remembered
    verified.clear()
    reader = StepCheckpoints(tmp_path, keep=3)
    assert reader.latest_valid() == (8, tmp_path / "step-000008")
    reader.save(9, _write, {})  # step 8 was verified by latest_valid: not again
    assert verified == ["step-000008", "step-000007"]


def test_slurm_job_id_needs_both_array_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    from artifacts import slurm_job_id

    monkeypatch.setenv("SLURM_JOB_ID", "555")
    array = ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")
    for present, absent in (array, array[::-1]):
        monkeypatch.setenv(present, "9")
        monkeypatch.delenv(absent, raising=False)
        assert slurm_job_id() == "555"
    monkeypatch.setenv("SLURM_JOB_ID", "")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert slurm_job_id() is None  # an empty variable is no job


def test_a_huge_lock_file_is_no_holder(tmp_path: Path) -> None:
    holder = {"host": "h", "pid": 1}
    text = json.dumps(holder)
    (tmp_path / LOCK_NAME).write_text(text + " " * ((1 << 20) - len(text)))  # exactly the 1 MiB bound
    assert read_holder(tmp_path) == holder
    (tmp_path / LOCK_NAME).write_text(text + " " * ((1 << 20) - len(text) + 1))
    assert read_holder(tmp_path) is None


def test_the_lock_file_is_not_executable_and_a_planted_link_is_named(tmp_path: Path) -> None:
    with RunLock(tmp_path / "run"):
        pass
    assert stat.S_IMODE((tmp_path / "run" / LOCK_NAME).stat().st_mode) == 0o644 & ~UMASK
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / LOCK_NAME).symlink_to(tmp_path / "theirs")
    with pytest.raises(UnsafePathError) as info:
        RunLock(tmp_path / "other").acquire()
    assert str(info.value) == (f"{tmp_path / 'other' / LOCK_NAME} is a symbolic link; refusing to follow it out of "
                               "the run directory")
    assert not (tmp_path / "theirs").exists()  # nothing created through the link
