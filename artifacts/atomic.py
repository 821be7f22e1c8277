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
import stat
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


# errnos that mean "this storage cannot take the write", as opposed to a bug: the user must act
# (free space, raise a quota, pick a writable --run-root) and then rerun to resume.
# ENOTDIR: a run root below a regular file, an unwritable root like any other.
STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)


class StorageError(OSError):
    """A write failed because of the storage (full, quota, read-only, no permission).

    Carries the path being written and, where known, how many bytes the write needed, so the one-line
    message can say what to do. Raised in place of the bare OSError, whose filename is often None for
    a failed write() or fsync().
    """

    def __init__(self, err: OSError, path: StrPath, num_bytes: int | None = None) -> None:
        super().__init__(err.errno, err.strerror or str(err), str(path))
        self.path = Path(path)
        self.num_bytes = num_bytes


def storage_guard(err: BaseException, path: StrPath, num_bytes: int | None = None) -> None:
    """Re-raise a failed write of ``path`` as a StorageError when the storage is at fault; else return."""
    if isinstance(err, OSError) and not isinstance(err, StorageError) and err.errno in STORAGE_ERRNOS:
        raise StorageError(err, path, num_bytes) from err


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
    """Replace ``path`` with ``data`` atomically and durably; the parent dir must exist.

    Raises StorageError (naming ``path`` and the size) when the storage refuses the write.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_name(path.name), dir=path.parent)
    except OSError as exc:
        storage_guard(exc, path, len(data))
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # The old file (if any) is untouched; only the half-written temp file has to go.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        storage_guard(exc, path, len(data))
        raise
    fsync_dir(path.parent)


def append_text(path: StrPath, text: str) -> None:
    """Append to a log file (not atomic: readers drop a torn last line); StorageError when refused."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        storage_guard(exc, path, len(text.encode()))
        raise


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> None:
    """``atomic_write_bytes`` for text."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: StrPath, obj: Any) -> None:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=2) + "\n")


def staging_dir(final_dir: StrPath) -> Path:
    """Create a fresh, empty temp dir next to ``final_dir`` (same file system, so rename works)."""
    final_dir = Path(final_dir)
    try:
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(final_dir.name), dir=final_dir.parent))
        os.chmod(tmp, _DIR_MODE)
    except OSError as exc:
        storage_guard(exc, final_dir)
        raise
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


class UnsafePathError(ValueError):
    """A path inside a run directory that leads out of it (a symbolic link, '..', an absolute name)."""


def inside(directory: StrPath, rel: str) -> Path:
    """``directory / rel``, refusing any component that is a symlink or leaves ``directory``.

    Run directories on shared scratch can be altered by other users: a planted link would make a
    manifest check hash, or a report read, a file outside the run. Our writers never create links.
    """
    directory = Path(directory)
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise UnsafePathError(f"{directory}: {rel!r} is not a relative path inside the directory")
    if directory.is_symlink():
        raise UnsafePathError(f"{directory} is a symbolic link; refusing to follow it")
    path = directory
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise UnsafePathError(f"{path} is a symbolic link; refusing to follow it out of {directory}")
    return path


class UnreadableFileError(ValueError):
    """A file of a run directory that cannot be read as the small regular file it should be: a FIFO (a read
    would block forever), a device, a directory, a symbolic link where none is followed, over the size
    bound, or an I/O error. The message is one line naming the path."""


# The largest JSON/YAML file of a run directory read whole (results.json, config.yaml, a manifest): a bound,
# so a planted multi-GB file costs an error line, not all of memory.
MAX_SMALL_FILE_BYTES = 256 << 20


def read_regular_bytes(path: StrPath, max_bytes: int = MAX_SMALL_FILE_BYTES, follow_symlinks: bool = True) -> bytes:
    """The bytes of a regular file, bounded, never blocking: FileNotFoundError when absent, else
    UnreadableFileError for anything that is not a regular file of at most `max_bytes` (or cannot be read)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except FileNotFoundError:
        raise
    except OSError as exc:
        why = "a symbolic link, not followed" if exc.errno == errno.ELOOP and not follow_symlinks else exc.strerror
        raise UnreadableFileError(f"{path}: cannot read ({why})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = (
                "a directory"
                if stat.S_ISDIR(info.st_mode)
                else "a FIFO"
                if stat.S_ISFIFO(info.st_mode)
                else "a device or socket"
            )
            raise UnreadableFileError(f"{path}: is {kind}, not a regular file")
        if info.st_size > max_bytes:
            raise UnreadableFileError(f"{path}: {info.st_size} bytes, over the {max_bytes} bytes this file may have")
        data = read_fd_bounded(fd, max_bytes)
        if data is None:
            raise UnreadableFileError(f"{path}: over the {max_bytes} bytes this file may have")
    except OSError as exc:
        raise UnreadableFileError(f"{path}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    return data


def read_fd_bounded(fd: int, max_bytes: int) -> bytes | None:
    """What is left to read of an open file (made blocking first), or None as soon as it passes max_bytes: a
    file that grew while being read after its size was checked. The callers say what the bound was for."""
    os.set_blocking(fd, True)
    chunks, total = [], 0
    while chunk := os.read(fd, _CHUNK_BYTES):
        total += len(chunk)
        if total > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def read_regular_text(path: StrPath, max_bytes: int = MAX_SMALL_FILE_BYTES, follow_symlinks: bool = True) -> str:
    """read_regular_bytes decoded as UTF-8; UnreadableFileError (one line, with the byte offset) otherwise."""
    raw = read_regular_bytes(path, max_bytes, follow_symlinks)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def read_text_inside(directory: StrPath, rel: str, encoding: str = "utf-8") -> str:
    """The text of ``directory/rel``, never through a symbolic link (O_NOFOLLOW on the last component)."""
    path = inside(directory, rel)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read().decode(encoding)


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
