"""Entry point: `uv run python main.py [--mode synthetic] [--method NAME] ...`; see README.md.

Exit codes: 0 done, 2 bad input, 3 run directory locked by another writer, 75 stopped by a signal
after saving a checkpoint (run the same command again to resume), anything else a failure.
"""

import sys

from training.cli import main

if __name__ == "__main__":
    sys.exit(main())
