"""Stop requests from the cluster: the handler only sets a flag.

Saving inside a signal handler can deadlock (the handler may interrupt a half-finished write or a
lock held by the allocator), so the loop polls the flag at step and eval-batch boundaries, saves a
step checkpoint there and exits with EXIT_RESUME. SIGUSR2 is what submitit and our run_job.sh send
before a time limit; SIGUSR1 is accepted too (NCCL may grab it, so it is not our default); SIGTERM
is what `scancel` and preemption send.
"""

from __future__ import annotations

import signal
from types import FrameType

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_LOCKED = 3
EXIT_RESUME = 75  # EX_TEMPFAIL: stopped cleanly, run the same command again to resume

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopRequested(Exception):
    """Raised at a step boundary after the step checkpoint is saved."""


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> "StopFlag":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
