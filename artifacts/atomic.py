"""Crash-safe file and directory writes.

Every write goes to a temp entry in the same directory (so the final rename is atomic on POSIX),
is fsynced, renamed into place, and then the parent directory is fsynced so the rename itself is
durable. Without the last step a power loss or node crash can "undo" a rename that the process
already reported as done. Temp entries are named ``.tmp-<name>-<pid>-<rand>``; readers skip anything
starting with ``.tmp-`` and the lock holder removes leftovers with ``cleanup_stale_tmp``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]

TMP_PREFIX = ".tmp-"
_CHUNK_BYTES = 1 << 20

# mkstemp/mkdtemp create 0600/0700 entries; results on a shared cluster file system must stay
# readable by the group like any other file, so we apply the process umask ourselves. Reading the
# umask means setting it, which is only done once here at import time.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


def fsync_dir(path: StrPath) -> None:
    """fsync a directory so that entries created/renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network file systems refuse fsync on a directory; they commit metadata
        # synchronously anyway, so there is nothing more we can do.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _tmp_name(final_name: str) -> str:
    return f"{TMP_PREFIX}{final_name}-{os.getpid()}-"


def atomic_write_bytes(path: StrPath, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably; the parent dir must exist."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_name(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # The old file (if any) is untouched; only the half-written temp file has to go.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> None:
    """``atomic_write_bytes`` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: StrPath, obj: Any) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=2) + "\n")


def staging_dir(final_dir: StrPath) -> Path:
    """Create a fresh, empty temp dir next to ``final_dir`` (same file system, so rename works)."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(final_dir.name), dir=final_dir.parent))
    os.chmod(tmp, _DIR_MODE)
    return tmp


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root`` (bottom-up), and ``root`` itself."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue  # a link's target is not ours to flush
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def remove_path(path: StrPath) -> None:
    """Remove a file or directory tree so it disappears in one atomic step.

    A plain ``rmtree`` interrupted half-way leaves a directory that still has its name but only
    some of its files. Renaming it to a ``.tmp-`` name first makes it vanish for readers at once;
    if we crash during the ``rmtree`` the leftover is removed by ``cleanup_stale_tmp``.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    doomed = _aside_name(path)
    os.rename(path, doomed)
    fsync_dir(path.parent)
    _remove_now(doomed)


def _aside_name(path: Path) -> Path:
    """A unique ``.tmp-old-...`` sibling name to move ``path`` to before deleting it."""
    return path.with_name(f"{TMP_PREFIX}old-{path.name}-{os.getpid()}-{os.urandom(4).hex()}")


def _remove_now(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def commit_dir(tmp_dir: StrPath, final_dir: StrPath) -> None:
    """Durably rename the fully written ``tmp_dir`` to ``final_dir``, replacing it if present.

    An existing ``final_dir`` is stale or invalid by construction (a writer only re-commits a name it
    is replacing). It is first renamed aside to ``.tmp-old-...`` and deleted after the new dir is in
    place. Crash windows: before the first rename nothing changed; between the two renames
    ``final_dir`` is absent, which readers treat as "not committed" (never as half-valid), and the
    moved-aside copy is a ``.tmp-`` entry that readers ignore and ``cleanup_stale_tmp`` removes;
    after the second rename the new dir is complete because every file in it was fsynced first.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    _fsync_tree(tmp_dir)
    old: Path | None = None
    if final_dir.exists() or final_dir.is_symlink():
        old = _aside_name(final_dir)
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if tmp_dir.parent.resolve() != final_dir.parent.resolve():
        fsync_dir(tmp_dir.parent)
    if old is not None:
        _remove_now(old)


def cleanup_stale_tmp(directory: StrPath) -> list[Path]:
    """Remove leftover ``.tmp-*`` entries directly in ``directory``; returns what was removed.

    Only the process holding the run lock may call this: another live writer's temp entries look
    exactly like a crashed writer's.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(TMP_PREFIX):
            _remove_now(entry)
            removed.append(entry)
    if removed:
        fsync_dir(directory)
    return removed


def sha256_bytes(b: bytes) -> str:
    """Hex sha256 of ``b``."""
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: StrPath) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so large checkpoints do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()
