"""Entry point: `uv run python main.py [--mode synthetic] [--method NAME] ...`; see README.md.

Exit codes: 0 done, 2 bad input, 3 run directory locked by another writer, 75 stopped by a signal
after saving a checkpoint (run the same command again to resume), anything else a failure.
"""

import sys

from training.signals import StopFlag

# Before the heavy imports: a SIGUSR2/SIGTERM that arrives while torch loads (seconds on a busy node)
# must set the flag, not kill the process, or the job dies instead of checkpointing and requeueing.
STOP = StopFlag().install()

from training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stop=STOP))
