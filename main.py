"""Entry point: `uv run python main.py [--mode synthetic] [--method NAME] ...`; see README.md.

Exit codes (docs/design.md, "Exit codes"): 0 done, 2 bad input, 3 run directory locked by another
writer, 65 a state file that is not plain data (refused, never executed), 74 storage full or
unwritable, 75 stopped by a signal (run the same command again to resume), 130 aborted by a second
Ctrl-C; anything else is a bug.
"""

import sys

from training.signals import EXIT_RESUME, StopFlag

# First thing: a SIGUSR2/SIGTERM/SIGINT that arrives while torch loads (seconds on a busy node) must end the
# process cleanly (exit 75, no traceback), not kill it with a default handler.
STOP = StopFlag().install()

# A quiet console (OMP_WAIT_POLICY=PASSIVE before torch loads; bitsandbytes' kernels warning, the hub's
# progress bars, transformers/peft deprecations): scripts/command.py quiet_libraries, shared by every entry
# point. It must run before torch and transformers are imported. Tests keep the noise visible.
from scripts.command import exit_quietly, quiet_libraries, use_command_notice  # noqa: E402  (light: no torch)

quiet_libraries()

# Jobs over run directories; they sit above the training loop, so main.py (not training/) dispatches them.
# Each module's main(argv) follows scripts/command.py's contract (exit codes, stops, one line per problem).
SUBCOMMANDS = {"status": "scripts.status", "export": "scripts.export", "compare": "scripts.compare",
               "pool_probes": "scripts.pool_probes", "launch": "scripts.launch", "landscape": "scripts.landscape",
               "lm_eval": "scripts.lm_eval_job"}

if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in SUBCOMMANDS:
        import importlib

        use_command_notice()  # a job's first Ctrl-C does not "save a step checkpoint"
        # Importing torch takes seconds; a stop meanwhile only sets the flag and ends the job right after the
        # import (nothing written): raised inside torch's import, it can abort the interpreter (SIGABRT, seen).
        try:
            job = importlib.import_module(SUBCOMMANDS[sys.argv[1]])
        except KeyboardInterrupt:
            print("\naborted by a second Ctrl-C; nothing was written (exit 130)", file=sys.stderr)
            exit_quietly(130)
        if STOP:
            print(f"stopped: {STOP.signal_name}; nothing was written (exit {EXIT_RESUME})", file=sys.stderr)
            exit_quietly(EXIT_RESUME)  # a second Ctrl-C now must not turn 75 into a kill by SIGINT
        exit_quietly(job.main(sys.argv[2:]))  # the job's main reuses STOP (scripts/command.py)
    # The same for training: a stop during the imports is acted on right after them, never raised inside
    # torch's import.
    try:
        from training.cli import main
    except KeyboardInterrupt:
        exit_quietly(130)
    if STOP:
        print(f"stopped: {STOP.signal_name} while starting; nothing was written, run the same command again "
              f"(exit {EXIT_RESUME})", file=sys.stderr)
        exit_quietly(EXIT_RESUME)
    try:
        code = main(stop=STOP)
    except KeyboardInterrupt:  # a second Ctrl-C in the instant after main's own handling ended
        code = 130
    # Interpreter teardown (seconds with torch loaded) puts the default handler back wherever a Python
    # handler was installed, and a stop signal then kills a process whose work is done (-15, -2). It
    # leaves SIG_IGN alone, and unlike a blocked mask (per thread: torch's threads would still take the
    # signal) ignoring holds for the whole process: exit_quietly ignores them, then exits.
    exit_quietly(code)
