"""Entry point: `uv run python main.py [--mode synthetic] [--method NAME] ...`; see README.md.

Exit codes (docs/design.md, "Exit codes"): 0 done, 2 bad input, 3 run directory locked by another
writer, 65 a state file that is not plain data (refused, never executed), 74 storage full or
unwritable, 75 stopped by a signal (run the same command again to resume), 130 aborted by a second
Ctrl-C; anything else is a bug.
"""

import logging
import os
import signal
import sys
import warnings

# OpenMP threads that spin while waiting make torch 5-10x slower whenever anything else shares the
# cores (measured in docs/benchmarks.md); passive waiting costs almost nothing on an idle machine.
# It must be set before torch loads its OpenMP runtime; a value the user exported wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A quiet console: the progress bars, the committed periods and the table. peft imports bitsandbytes
# whenever it is installed, and on a CPU without its optional kernels package bitsandbytes logs a
# warning on import although nothing asked for 4-bit; transformers warns about its own deprecations
# from inside its code. Neither is actionable for a user of this CLI. Tests keep them visible.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# transformers' "Loading weights" / "Writing model shards" bars and datasets' per-file bars: the run's own
# bars (training, evaluation) carry the ETA that matters. A value the user exported wins.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft|accelerate)(\.|$)")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft|accelerate)(\.|$)")
# peft warns whenever an adapter sits on a tied embedding (the synthetic preset adapts embed_tokens) that
# merging may be complicated: our export merges such adapters itself, untying the head (docs/export.md).
warnings.filterwarnings("ignore", message=r".*tie_word_embeddings=True. and a tied layer is part of the adapter",
                        category=UserWarning)

from training.signals import EXIT_RESUME, STOP_SIGNALS, StopFlag, StopRequested  # noqa: E402

# Before the heavy imports: a SIGUSR2/SIGTERM/SIGINT that arrives while torch loads (seconds on a busy
# node) must end the process cleanly (exit 75, no traceback), not kill it with a default handler.
STOP = StopFlag().install()

# Jobs that read finished runs; they sit above the training loop, so main.py (not training/) dispatches them.
SUBCOMMANDS = {"status": "scripts.status", "export": "scripts.export"}

if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in SUBCOMMANDS:
        import importlib

        sys.exit(importlib.import_module(SUBCOMMANDS[sys.argv[1]]).main(sys.argv[2:]))
    try:
        with STOP.immediately():
            from training.cli import main
    except StopRequested as exc:
        print(f"stopped: {exc}; nothing was written, run the same command again (exit {EXIT_RESUME})",
              file=sys.stderr)
        sys.exit(EXIT_RESUME)
    except KeyboardInterrupt:
        sys.exit(130)
    try:
        code = main(stop=STOP)
    except KeyboardInterrupt:  # a second Ctrl-C in the instant after main's own handling ended
        code = 130
    # Interpreter teardown (seconds with torch loaded) puts the default handler back wherever a Python
    # handler was installed, and a stop signal then kills a process whose work is done (-15, -2). It
    # leaves SIG_IGN alone, and unlike a blocked mask (per thread: torch's threads would still take the
    # signal) ignoring holds for the whole process.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    sys.exit(code)
