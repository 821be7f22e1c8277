"""Entry point: `uv run python main.py [--mode synthetic] [--method NAME] ...`; see README.md.

Exit codes: 0 done, 2 bad input, 3 run directory locked by another writer, 75 stopped by a signal
after saving a checkpoint (run the same command again to resume), anything else a failure.
"""

import os
import sys

# OpenMP threads that spin while waiting make torch 5-10x slower whenever anything else shares the
# cores (measured in docs/benchmarks.md); passive waiting costs almost nothing on an idle machine.
# It must be set before torch loads its OpenMP runtime; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from training.signals import StopFlag  # noqa: E402

# Before the heavy imports: a SIGUSR2/SIGTERM that arrives while torch loads (seconds on a busy node)
# must set the flag, not kill the process, or the job dies instead of checkpointing and requeueing.
STOP = StopFlag().install()

from training.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stop=STOP))
