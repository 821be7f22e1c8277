"""One command-line contract for every entry point over run directories (docs/design.md, "Exit codes").

    from scripts.command import BadInput, Parser, command

    @command("status")                       # read-only: a stop signal ends it at once (75 / 130)
    def main(argv: list[str]) -> int: ...

    @command("export", writes=True)          # writing: a stop rolls the staging back, then 75
    def main(argv: list[str]) -> int: ...

    if __name__ == "__main__":
        sys.exit(main())

`command` turns a function of argv into `main(argv=None) -> int` that every entry point shares (pip's base
command does the same for its subcommands): the project's error classes become the documented exit codes
with one `error:` line per problem, a stop signal ends the command cleanly, and anything unexpected is a
bug: one line saying so and naming the file the full traceback was written to. The function may raise
instead of printing its own errors.

| raised | exit |
| --- | --- |
| BadInput (and argparse errors through Parser), ConfigError, DataError | 2 |
| LockHeldError | 3 |
| UnsafeStateError, UnsafePathError, UnreadableFileError (a pickle, a symbolic link, a run's file that is not
  what main.py writes: not JSON, a FIFO, over its size bound) | 65 |
| StorageError, an OSError whose errno says the storage refused a write, a write the file system refused | 74 |
| a stop signal (SIGTERM, SIGUSR1/2, the first Ctrl-C): StopRequested | 75 |
| a second Ctrl-C: KeyboardInterrupt | 130 |
| anything else: a bug; the traceback goes to a file under the system temp dir | 70 (EX_SOFTWARE) |

Stops: the whole command runs inside `StopFlag.immediately()`, so a stop raises at once wherever the command
is (reading, building a model, writing its staging directory): a writing command removes its staging on the
way out (its `except BaseException` clean-up) and nothing under the final name changes. The one step that
must not be cut, the rename that commits the result, runs inside `uninterruptible()`; a stop that arrives
then takes effect at the next `check_stop()`. A stop after the command's work is done changes nothing: the
exit status is the command's own.

This module imports nothing heavy (no torch): a script calls `prepare()` before its own imports, so a stop
during the seconds of importing torch ends in 75 right after the imports (the flag is only set meanwhile: a
StopRequested raised inside torch's own import can abort the interpreter with SIGABRT, seen in the signal
test; a command therefore imports its heavy libraries at module level, before its body runs), and the library
noise main.py silences stays silent. Layer: scripts/ (jobs); training/ never imports it.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import re
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from artifacts.rundir import BadInput  # re-exported: every command raises it; the run directory refuses with it too
from training.signals import (EXIT_ABORTED, EXIT_BAD_INPUT, EXIT_LOCKED, EXIT_RESUME, EXIT_STORAGE, EXIT_UNTRUSTED,
                              STOP_SIGNALS, StopFlag, StopRequested)

EXIT_BUG = 70  # EX_SOFTWARE: an unexpected exception, i.e. a bug in the toolkit; the traceback is in a file


class Parser(argparse.ArgumentParser):
    """argparse that raises BadInput (one line, exit 2) instead of printing its usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{self.prog}: {message}")


# ------------------------------------------------------------------------------------------------
# the console and the stop flag, set up before the heavy imports


def quiet_libraries() -> None:
    """What main.py silences, for every entry point: bitsandbytes' import-time warning about its optional
    kernels, the hub's progress bars, transformers/peft/accelerate deprecation warnings, and peft's note
    about adapters on tied embeddings (the export merges those itself). Values the user exported win."""
    # OpenMP threads that spin while waiting make torch 5-10x slower whenever anything else shares the
    # cores (docs/benchmarks.md); it must be set before torch loads its OpenMP runtime.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    libraries = r"(transformers|peft|accelerate)(\.|$)"
    warnings.filterwarnings("ignore", category=FutureWarning, module=libraries)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=libraries)
    warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True. and a tied layer is part of the adapter",
                            category=UserWarning)


# StopFlag's first-Ctrl-C notice speaks of saving a step checkpoint, which is training's; a command says this
_NOTICE = b"\nstopping; press Ctrl-C again to abort\n"


def use_command_notice() -> bytes:
    """Make the first Ctrl-C's notice the command's own; returns the one it replaces (to put back)."""
    import training.signals as signals

    previous, signals._FIRST_CTRL_C = signals._FIRST_CTRL_C, _NOTICE
    return previous


def installed_flag() -> StopFlag | None:
    """The StopFlag whose handler is installed for SIGTERM now (main.py's, or prepare()'s), if any."""
    handler = signal.getsignal(signal.SIGTERM)
    owner = getattr(handler, "__self__", None)
    return owner if isinstance(owner, StopFlag) else None


def prepare() -> StopFlag:
    """Call first thing in a script's `__main__` path, before importing torch: quiet the libraries and
    install the stop flag, so that a stop while the imports run is already a clean exit 75."""
    quiet_libraries()
    use_command_notice()
    return installed_flag() or StopFlag().install()


_ACTIVE: list[StopFlag] = []  # the flag of the command running now (innermost last)


@contextmanager
def uninterruptible() -> Iterator[None]:
    """A step that must finish once begun (the rename that commits a result): a stop that arrives meanwhile
    is kept and takes effect at the next check_stop(), not inside the step."""
    flag = _ACTIVE[-1] if _ACTIVE else None
    if flag is None:
        yield
        return
    # StopFlag raises at once only while its _immediate is set (training/signals.py); clearing it defers.
    was = flag._immediate
    flag._immediate = False
    try:
        yield
    finally:
        flag._immediate = was


def check_stop() -> None:
    """Raise StopRequested if a stop arrived (during an uninterruptible step); between units of work."""
    flag = _ACTIVE[-1] if _ACTIVE else None
    if flag:
        raise StopRequested(f"{flag.signal_name}")


# ------------------------------------------------------------------------------------------------
# errors -> exit codes


# safetensors and other Rust writers report the OS error only in their text: "... Os { code: 28, ... }"
_RUST_OS_ERROR = re.compile(r"Os \{ code: (\d+)")
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                             errno.ENOTDIR})


def storage_errno(exc: BaseException) -> int | None:
    """The errno of a storage refusal anywhere in the exception's chain (OSError, or a library that only
    quotes the OS error in its message), else None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _STORAGE_ERRNOS:
            return cur.errno
        match = _RUST_OS_ERROR.search(str(cur))
        if match and int(match.group(1)) in _STORAGE_ERRNOS:
            return int(match.group(1))
        cur = cur.__cause__ or cur.__context__
    return None


def storage_refused(exc: BaseException, directory: Path) -> OSError | None:
    """A write into `directory` failed with `exc`: the OSError to report when the storage is at fault (by
    the errno in the exception, or because the file system is now full or read-only: some writers, torch's
    zip writer for one, lose the errno), else None (a bug, re-raised by the caller)."""
    code = storage_errno(exc)
    if code is None:
        try:
            st = os.statvfs(directory if directory.exists() else directory.parent)
        except OSError:
            return None
        if st.f_flag & os.ST_RDONLY:
            code = errno.EROFS
        elif st.f_bavail * st.f_frsize < (1 << 20):
            code = errno.ENOSPC
        else:
            return None
    return OSError(code, os.strerror(code), str(directory))


def _line(text: str) -> str:
    return " ".join(str(text).splitlines())


def _say(*lines: str) -> None:
    for line in lines:
        print("error: " + _line(line), file=sys.stderr)


def _bug(name: str, exc: BaseException) -> int:
    """One line for an unexpected exception, the traceback in a file under the temp dir."""
    text = "".join(traceback.format_exception(exc))
    where = "stderr (the temp dir is not writable)"
    try:
        fd, path = tempfile.mkstemp(prefix=f"clkit-{name}-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".traceback")
        with os.fdopen(fd, "w") as fh:
            fh.write(f"clkit {name} {' '.join(sys.argv[1:])}\n{text}")
        where = path
    except OSError:
        sys.stderr.write(text)
    print(f"error: bug in clkit {name}: {type(exc).__name__}: {_line(str(exc))[:300]}; the full traceback is in "
          f"{where}; please report it (exit {EXIT_BUG})", file=sys.stderr)
    return EXIT_BUG


def exit_code(name: str, exc: BaseException, flag: StopFlag | None = None) -> int:
    """Print the one-line message(s) for `exc` and return its exit code."""
    from artifacts import LockHeldError, StorageError, UnreadableFileError, UnsafePathError, UnsafeStateError
    from data.errors import DataError

    if isinstance(exc, StopRequested):
        what = (flag.signal_name if flag is not None and flag.signal_name else str(exc)) or "a stop signal"
        print(f"stopped: {what}; {name} stopped without changing anything it had not finished; run the same "
              f"command again (exit {EXIT_RESUME})", file=sys.stderr)
        return EXIT_RESUME
    if isinstance(exc, KeyboardInterrupt):
        print(f"\naborted by a second Ctrl-C (exit {EXIT_ABORTED})", file=sys.stderr)
        return EXIT_ABORTED
    if isinstance(exc, LockHeldError):
        _say(str(exc))
        return EXIT_LOCKED
    if isinstance(exc, (UnsafeStateError, UnsafePathError)):
        _say(str(exc))
        return EXIT_UNTRUSTED
    if isinstance(exc, UnreadableFileError):  # a run's file that is not what main.py writes there
        _say(f"{exc}; main.py did not write it so (a damaged or altered run directory), so nothing is read from "
             f"it (exit {EXIT_UNTRUSTED})")
        return EXIT_UNTRUSTED
    if isinstance(exc, StorageError) or (isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS):
        where = getattr(exc, "filename", None) or getattr(exc, "path", "?")
        _say(f"cannot write {where}: {exc.strerror}; nothing of this {name} was committed; free space or pick "
             f"a writable place and run the same command again (exit {EXIT_STORAGE})")
        return EXIT_STORAGE
    problems = getattr(exc, "problems", None)
    if isinstance(exc, BadInput) or (isinstance(exc, DataError) and problems) or type(exc).__name__ == "ConfigError":
        _say(*(problems or [str(exc)]))
        return EXIT_BAD_INPUT
    return _bug(name, exc)


def run(name: str, body: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run `body(argv)` under the contract; returns the exit code (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    flag = installed_flag()
    owned = flag is None
    if flag is None:
        flag = StopFlag().install()
    _ACTIVE.append(flag)
    notice = use_command_notice()
    done: list[int] = []
    try:
        with flag.immediately():
            code = body(argv)
            done.append(0 if code is None else int(code))
        return done[0]
    except SystemExit as exc:  # --help, or a body that exits itself
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_BAD_INPUT)
    except BaseException as exc:  # noqa: BLE001: every failure ends in its line and code, a bug included
        if done and isinstance(exc, (StopRequested, KeyboardInterrupt)):
            return done[0]  # the work was finished when the stop came: it counts
        try:
            return exit_code(name, exc, flag)
        except KeyboardInterrupt:  # a second Ctrl-C while the first stop's line is printed
            return EXIT_ABORTED
    finally:
        import training.signals as signals

        signals._FIRST_CTRL_C = notice
        _ACTIVE.pop()
        if owned:
            flag.uninstall()
        sys.stdout.flush()


def command(name: str) -> Callable[[Callable[[list[str]], int]], Callable[..., int]]:
    """Decorator: `body(argv) -> int` becomes `main(argv=None) -> int` under the contract."""
    def wrap(body: Callable[[list[str]], int]) -> Callable[..., int]:
        @functools.wraps(body)
        def main(argv: Sequence[str] | None = None) -> int:
            return run(name, body, argv)
        main.body = body  # type: ignore[attr-defined]
        return main
    return wrap


def exit_quietly(code: int) -> None:
    """sys.exit for an entry point: a stop signal during interpreter teardown (seconds with torch loaded)
    must not kill a process whose work is done, so the stop signals are ignored from here on (main.py)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
