"""The one exception type of the data package, and the one reader of users' data files it speaks for.

DataError subclasses ValueError so callers that already treat bad input as ValueError keep working;
main.py maps it to exit code 2. It holds one or more problems, each ONE line naming the file or field
and what would have been valid, because the CLI prints each as its own ``error:`` line. ``str()``
joins them with ``; `` for callers that show a single message.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from artifacts.atomic import read_fd_bounded


class DataError(ValueError):
    """Bad benchmark input: a config field, a file, a record or a field of a record."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        items = [problems] if isinstance(problems, str) else list(problems)
        # Values quoted from user files may carry newlines; keep the contract of one line per problem.
        self.problems = [" ".join(str(p).splitlines()) for p in items]
        super().__init__("; ".join(self.problems))


# The largest user data file read whole (a JSONL/CSV task file, a benchmark JSON): a bound, so that
# `path: /dev/zero` or a mistyped path to a disk image ends in one line instead of all of memory.
MAX_USER_FILE_BYTES = 4 << 30


def read_user_text(path: os.PathLike[str] | str, context: str = "", max_bytes: int = MAX_USER_FILE_BYTES) -> str:
    """A user's UTF-8 text file as users write it: a leading byte-order mark (what Excel's "CSV UTF-8" and
    some editors write) is dropped. Refused with one DataError line naming the file: anything but a regular
    file (a FIFO would block forever, a device never ends), a file over `max_bytes`, bytes that are not
    UTF-8, a file that cannot be read. `context` is appended to the messages, e.g. "(task 'qa')"."""
    where = f"{path}" + (f" {context}" if context else "")
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer; the check below refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise DataError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{where}: is a directory, expected a file") from None
    except OSError as exc:
        raise DataError(f"{where}: cannot read ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise DataError(f"{where}: is a directory, expected a file")
        if not stat.S_ISREG(info.st_mode):
            kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device or socket"
            raise DataError(f"{where}: is {kind}, not a regular file; give a file")
        if info.st_size > max_bytes:
            raise DataError(f"{where}: {info.st_size} bytes, over the {max_bytes} bytes a data file may have")
        raw = read_fd_bounded(fd, max_bytes)
        if raw is None:  # grew while being read
            raise DataError(f"{where}: over the {max_bytes} bytes a data file may have")
    except OSError as exc:
        raise DataError(f"{where}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        raise DataError(f"{where}: not UTF-8 text (byte {offset})") from None
