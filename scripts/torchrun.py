"""torchrun that exits with its ranks' code: 75 when every rank stopped, 2 when they refused the input.

    uv run python scripts/torchrun.py --nproc-per-node 2 main.py --mode synthetic --set train.grad_accum=2

Takes torchrun's own arguments (it is torch.distributed.run, run in this process). Plain torchrun exits 1
whenever a rank exits non-zero, 75 and 2 included, and prints its agent's traceback and failure table,
so a script or a scheduler around it cannot tell "stopped, run again to resume" from "bad input" or a
crash. This launcher catches torch's ChildFailedError, reads each failed rank's exit code from its
`.failures` and exits with the ranks' common code, decided as run_job.sh decides for srun's ranks:

- a rank that failed outright (anything but 0, 75 or death by SIGUSR1/SIGUSR2/SIGTERM) decides: its
  code (the lowest such rank's), whatever the others did after losing it (they say 75, "lost contact");
- otherwise a stop on any rank means 75 (death by a stop signal counts as a stop: it came before
  main.py's handler was installed, with nothing newer than the last checkpoint to lose);
- otherwise 0.

A rank killed by a signal counts as 128 + the signal, as shells report it. One line says which rank
returned what; no traceback.

Signals: torchrun starts each rank in its own session, so a Ctrl-C or a `kill` reaches only the launcher,
whose agent then SIGTERMs the ranks and SIGKILLs them 30 s later (`--shutdown-timeout`), a deadline a
large model's step checkpoint can miss, and which loses the ranks' codes (torchrun then exits 1), and
SIGUSR1/SIGUSR2 kill torchrun outright. Here SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 are forwarded to every
rank instead (a second Ctrl-C is a second SIGINT, main.py's abort): the ranks stop at the next step
boundary, save, and exit 75 on their own, which this launcher returns. SIGHUP and SIGQUIT keep torch's
handling.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

EXIT_RESUME = 75  # training/signals.py; not imported, so the launcher does not import the toolkit
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
NAME = "torchrun.py"


def exit_code(returncode: int) -> int:
    """A process's status as a shell reports it: a death by signal n is 128 + n."""
    return 128 - returncode if returncode < 0 else returncode


def describe(code: int) -> str:
    if code > 128:
        try:
            return f"was killed by {signal.Signals(code - 128).name} ({code})"
        except ValueError:
            pass
    return f"exited {code}"


def common_code(codes: Mapping[int, int]) -> int:
    """The code of a run from each rank's exit code (as shells report it), run_job.sh's rule."""
    stops = {EXIT_RESUME, *(128 + s for s in STOP_SIGNALS)}
    failed = [codes[r] for r in sorted(codes) if codes[r] != 0 and codes[r] not in stops]
    if failed:
        return failed[0]
    return EXIT_RESUME if any(c != 0 for c in codes.values()) else 0


def summary(codes: Mapping[int, int], num_local: int | None) -> str:
    """One line: which rank returned what, and the code this launcher exits with."""
    code = common_code(codes)
    by_code: dict[int, list[int]] = {}
    for rank in sorted(codes):
        by_code.setdefault(codes[rank], []).append(rank)
    parts = [f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} {describe(c)}"
             for c, ranks in by_code.items()]
    if num_local is not None and len(codes) < num_local:
        parts.append("the others 0")
    why = {0: "", EXIT_RESUME: ": stopped, run the same command again to resume"}.get(code, "")
    if len(by_code) > 1 and code not in (0, EXIT_RESUME):
        why = ": a rank that failed decides, whatever the others did after losing it"
    return f"{NAME}: {'; '.join(parts)}; exit {code}{why}"


def child_pids() -> list[int]:
    """This process's children (the ranks: torch's agent starts each with Popen, in its own session)."""
    me, out = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == me:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile, or not ours to read
    return out


class StoppedBeforeStart(Exception):
    """A forwarded signal came while no rank was running: the launch is abandoned, nothing has run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def forward(signum: int, frame: FrameType | None, pids: list[int] | None = None) -> None:
    """The signal handler: the signal to every rank, or, before any rank runs, the end of the launch
    (raised into torch's agent, whose cleanup SIGTERMs a rank it may have started meanwhile)."""
    pids = child_pids() if pids is None else pids
    if not pids:
        raise StoppedBeforeStart(signum)
    for pid in pids:
        try:
            os.kill(pid, signum)  # the rank only, not its group: its own helpers keep torch's defaults
        except ProcessLookupError:
            pass


class _NoFailureLine(logging.Filter):
    """torch's agent logs each failed rank as an error; the summary line replaces those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed (exitcode")


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # torch's agent installs a handler for each of these (default SIGTERM,SIGINT,SIGHUP,SIGQUIT) that
    # SIGTERMs the ranks, SIGKILLs them after --shutdown-timeout and raises: the forwarded ones are ours
    ours = {s.name for s in FORWARDED}
    args.signals_to_handle = ",".join(s for s in (x.strip() for x in args.signals_to_handle.split(","))
                                      if s and s not in ours) or "SIGHUP"
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_NoFailureLine())
    for sig in FORWARDED:
        signal.signal(sig, forward)
    try:
        num_local: int | None = determine_local_world_size(args.nproc_per_node)
    except ValueError:
        num_local = None
    try:
        run(args)
        return 0
    except (StoppedBeforeStart, ChildFailedError, SignalException) as exc:
        outcome: BaseException = exc
    finally:
        for sig in FORWARDED:  # the ranks are gone: a late signal must not cut the summary short
            signal.signal(sig, signal.SIG_IGN)
    if isinstance(outcome, StoppedBeforeStart):
        print(f"{NAME}: got {outcome} before the ranks started; nothing ran; exit {128 + outcome.signum}",
              file=sys.stderr, flush=True)
        return 128 + outcome.signum
    if isinstance(outcome, SignalException):  # SIGHUP / SIGQUIT: torch's agent SIGTERMed the ranks and gave up
        print(f"{NAME}: got {outcome.sigval.name}; the ranks were sent SIGTERM; exit {128 + outcome.sigval}",
              file=sys.stderr, flush=True)
        return 128 + int(outcome.sigval)
    assert isinstance(outcome, ChildFailedError)
    codes = {int(rank): exit_code(failure.exitcode) for rank, failure in outcome.failures.items()}
    print(summary(codes, num_local), file=sys.stderr, flush=True)
    return common_code(codes)


if __name__ == "__main__":
    sys.exit(main())
