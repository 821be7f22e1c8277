"""One writer per run directory: an exclusive ``flock`` on ``<run_dir>/.lock``.

flock is held by the open file description and released by the kernel when the process dies, even
on SIGKILL or an OOM kill, so a requeued job never has to clean up a stale lock by hand. The lock
file is never deleted: a process that unlinks it while another waits would let a third process
create a fresh inode and lock that, and two writers would then both "hold" the lock.

Caveat: a forked child (e.g. a DataLoader worker) inherits the descriptor and keeps the lock alive
until it exits too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, final

from artifacts.atomic import StrPath, UnsafePathError, read_regular_bytes, storage_guard
from artifacts.manifest import utc_now_iso

LOCK_NAME = ".lock"
_NUM_ATTEMPTS = 4
_RETRY_SECONDS = 0.05


class LockHeldError(RuntimeError):
    """Another live process holds the run directory's lock."""

    def __init__(self, run_dir: Path, holder: dict[str, Any] | None) -> None:
        self.run_dir = run_dir
        self.holder = holder or {}
        h = self.holder
        super().__init__(
            f"run directory {run_dir} is locked by host={h.get('host', '?')} pid={h.get('pid', '?')} "
            f"slurm_job_id={h.get('slurm_job_id', '?')} since {h.get('started', '?')}; "
            "wait for it or stop it"
        )


def slurm_job_id() -> str | None:
    """This process's SLURM job id; ``<array job>_<task>`` inside a job array, None outside SLURM."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        # SLURM_JOB_ID of an array task is a unique number nobody recognises; squeue and
        # scancel show the <array job>_<task> form.
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def _parse_holder(raw: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def read_holder(run_dir: StrPath) -> dict[str, Any] | None:
    """The holder info last written to the lock file (it may describe a dead process), or None."""
    try:  # a lock file planted as a FIFO, a link or a huge file is no holder (and must not block a reader)
        return _parse_holder(read_regular_bytes(Path(run_dir) / LOCK_NAME, 1 << 20, follow_symlinks=False))
    except (OSError, ValueError):
        return None


def live_holder(run_dir: StrPath) -> dict[str, Any] | None:
    """Holder info if a live process holds the lock now, else None. Never creates the lock file."""
    try:
        # O_NONBLOCK: opening a FIFO planted as the lock file must not wait for a writer
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(f"{Path(run_dir) / LOCK_NAME} is a symbolic link; refusing to follow it") from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_holder(run_dir) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@final  # not meant to be subclassed, so __enter__ returns exactly a RunLock
class RunLock:
    """Exclusive, non-blocking lock on a run directory; use as ``with RunLock(run_dir): ...``."""

    def __init__(self, run_dir: StrPath) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def acquire(self) -> dict[str, Any]:
        """Take the lock and record who holds it; raises LockHeldError if another holder is live."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            storage_guard(exc, self.run_dir)
            raise
        # No O_TRUNC: opening must not wipe the current holder's info before we know we own it.
        # O_NOFOLLOW: a lock file planted as a link must not make us create or truncate a file elsewhere.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(
                    f"{self.path} is a symbolic link; refusing to follow it out of the run directory"
                ) from None
            storage_guard(exc, self.path)
            raise
        try:
            self._flock_with_retry(fd)
        except BaseException:
            os.close(fd)
            raise
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": slurm_job_id(),
            "started": utc_now_iso(),
        }
        try:
            # Written only after flock succeeded, on the locked descriptor, so the file always
            # names the process that actually holds the lock (or a dead previous holder).
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder, sort_keys=True) + "\n").encode("utf-8"), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return holder

    def _flock_with_retry(self, fd: int) -> None:
        # A few short retries: live_holder() (used by `main.py status`) takes a shared lock for an
        # instant, and a job starting at that moment must not fail as if a writer were running.
        for attempt in range(_NUM_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            if attempt + 1 < _NUM_ATTEMPTS:
                time.sleep(_RETRY_SECONDS)
        raise LockHeldError(self.run_dir, read_holder(self.run_dir))

    def release(self) -> None:
        """Release the lock (idempotent). The file stays: deleting it would break flock exclusion."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    close = release

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        # Closing the fd releases the flock; a lost RunLock must not pin the run dir forever.
        # Only os.close here: at interpreter shutdown other module globals may already be gone.
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            try:
                os.close(fd)
            except OSError:
                pass
