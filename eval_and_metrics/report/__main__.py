"""`python -m eval_and_metrics.report RUN_ROOT [--out DIR]`: the report's command line (cli.main)."""

import sys

from eval_and_metrics.report.cli import main

sys.exit(main())
