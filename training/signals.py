"""Stop requests (cluster signals and Ctrl-C) and the exit codes they lead to.

During training the handler only sets a flag: saving inside a signal handler can deadlock (the handler
may interrupt a half-finished write or a lock held by the allocator), so the loop polls the flag at
step and eval-batch boundaries, saves a step checkpoint there and exits with EXIT_RESUME. SIGUSR2 is
what submitit and our run_job.sh send before a time limit; SIGUSR1 is accepted too (NCCL may grab it,
so it is not our default); SIGTERM is what `scancel` and preemption send; SIGINT is Ctrl-C.

Before training starts (config, data generation, model loading) there is nothing to save, and a
generator or a model load can run for a while without passing a boundary, so inside
`stop.immediately()` the handler raises StopRequested at once instead: the process ends within
moments, and every file written so far was written atomically, so nothing is half-written.

Ctrl-C twice: the first press is a stop request like SIGTERM (and says so on the terminal); the second
aborts at once (KeyboardInterrupt, exit 130), losing at most the steps since the last checkpoint.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

EXIT_OK = 0
EXIT_BAD_INPUT = 2  # bad config, data or flag: one line per problem, nothing written
EXIT_LOCKED = 3  # another live process holds the run directory's lock
EXIT_UNTRUSTED = 65  # EX_DATAERR: a state file is not plain tensors/JSON (never unpickled) or is corrupt
EXIT_STORAGE = 74  # EX_IOERR: disk full, quota, read-only or unwritable run root; committed state intact
EXIT_RESUME = 75  # EX_TEMPFAIL: stopped cleanly, run the same command again to resume
EXIT_ABORTED = 130  # a second Ctrl-C: aborted without saving (128 + SIGINT, as shells report it)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

_FIRST_CTRL_C = b"\nstopping at the next step boundary, saving; press Ctrl-C again to abort\n"


class StopRequested(Exception):
    """Raised at a step boundary after the step checkpoint is saved, or at once before training."""


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._immediate = False
        self._num_sigint = 0
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def request(self, reason: str) -> None:
        """A stop that did not come as a signal to this process (another rank of the run got one)."""
        if self.signal_name is None:
            self.signal_name = reason

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT:
            self._num_sigint += 1
            if self._num_sigint >= 2:
                raise KeyboardInterrupt
            # os.write, not print: the handler may run while the main thread is inside a buffered write
            # to stderr (a progress bar), and a second write to the same buffer raises "reentrant call".
            os.write(2, _FIRST_CTRL_C)
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
        if self._immediate:
            self._immediate = False  # raise once; the unwinding code must not be interrupted again
            raise StopRequested(f"{self.signal_name} before training started")

    @contextmanager
    def immediately(self) -> Iterator[None]:
        """Within this block a stop request raises StopRequested at once (nothing to save yet)."""
        if self:
            raise StopRequested(f"{self.signal_name} before training started")
        self._immediate = True
        previous_hook = sys.unraisablehook

        def quiet(unraisable: Any) -> None:
            # A stop raised while a finaliser (__del__) runs cannot propagate: Python prints it as an
            # "Exception ignored" traceback and goes on. The flag still holds it; re-raised below.
            if not isinstance(unraisable.exc_value, StopRequested):
                previous_hook(unraisable)

        sys.unraisablehook = quiet
        try:
            yield
            if self:  # the stop was swallowed on its way (a finaliser, a library's broad except)
                raise StopRequested(f"{self.signal_name} before training started")
        except (StopRequested, KeyboardInterrupt):
            raise
        except Exception:
            # Our StopRequested can come back wrapped: transformers' lazy importer re-raises anything
            # raised during an import as ModuleNotFoundError. With the flag set, that is our stop.
            if self:
                raise StopRequested(f"{self.signal_name} before training started") from None
            raise
        finally:
            self._immediate = False
            sys.unraisablehook = previous_hook

    def install(self) -> StopFlag:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
