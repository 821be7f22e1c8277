"""Pool the probes of several temporal runs per method, with a Wilson 95% interval over the probes.

    uv run python scripts/pool_probes.py RUN_DIR [RUN_DIR ...] [--out PATH.md]

scripts/compare.py's interval is over training seeds (a t-interval: how much the method varies from
seed to seed). This one is over probes: each run's pooled exact-match rate times its probe count is a
number of correct probes, and the runs of one method are summed, so runs on different data seeds
(different invented worlds, hence different probes) give one estimate from all their probes. The
interval is Wilson's score interval for a binomial proportion, which stays inside [0, 1] and is not
degenerate at 0 or 1. It treats probes as independent: that holds across data seeds and within a run
(each probe is another fact), but two training seeds on one data seed score the same probes, so
pool those only with that in mind (the per-run rows show each run's own interval).

Read from each run's results.json only: `<metric>_pooled` and `<metric>_n`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/pool_probes.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from scripts.command import BadInput, Parser, command, exit_quietly, prepare  # noqa: E402

if __name__ == "__main__":
    prepare()

import yaml  # noqa: E402

from artifacts import RunDir, UnreadableFileError, read_regular_text  # noqa: E402

METRICS = [
    ("plasticity_storage", "Plast-S"),
    ("plasticity_extraction", "Plast-X"),
    ("stability_storage", "Stab-S"),
    ("stability_extraction", "Stab-X"),
    ("temporal_recall_storage", "TRec-S"),
    ("temporal_recall_extraction", "TRec-X"),
]
Z95 = 1.959963984540054


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (low, high) for `correct` successes out of `n`; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def counts_of(metrics: dict[str, Any], name: str) -> tuple[int, int] | None:
    """(correct, n) of one pooled metric; None when the run has no such probes."""
    rate, n = metrics.get(f"{name}_pooled"), metrics.get(f"{name}_n")
    if rate is None or not n:
        return None
    if not (isinstance(rate, (int, float)) and isinstance(n, int) and 0 <= rate <= 1 and n > 0):
        raise UnreadableFileError(f"results.json: {name}_pooled={rate!r}, {name}_n={n!r} are not a rate and a count")
    return round(float(rate) * int(n)), int(n)


def read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results.json, config.yaml) of a run as main.py writes them; UnreadableFileError (exit 65) otherwise."""
    run = RunDir(run_dir)
    try:
        results = json.loads(read_regular_text(run.results))
    except ValueError as exc:
        raise exc if isinstance(exc, UnreadableFileError) else \
            UnreadableFileError(f"{run.results}: not valid JSON ({str(exc)[:80]})") from None
    if not (isinstance(results, dict) and isinstance(results.get("metrics"), dict) and "method" in results):
        raise UnreadableFileError(f"{run.results}: not a results object (method, metrics)")
    config: Any = {}
    if os.path.lexists(run.config):  # a link loop or a FIFO is read, and refused
        try:
            config = yaml.safe_load(read_regular_text(run.config))
        except yaml.YAMLError:
            config = None
        if not isinstance(config, dict):
            raise UnreadableFileError(f"{run.config}: not a mapping of config sections")
    return results, config


def cell(counts: tuple[int, int] | None) -> str:
    if counts is None:
        return "—"
    k, n = counts
    low, high = wilson(k, n)
    return f"{k / n:.3f} [{low:.3f}, {high:.3f}] n={n}"


def table(run_dirs: list[Path]) -> str:
    rows, pooled = [], {}
    for run_dir in run_dirs:
        results, config = read_run(run_dir)
        metrics, method = results["metrics"], str(results["method"])
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        data_seed = data.get("seed", "?")
        per = {name: counts_of(metrics, name) for name, _ in METRICS}
        rows.append((f"{method}, data seed {data_seed}, seed {results.get('seed')}", per))
        total = pooled.setdefault(method, {name: (0, 0) for name, _ in METRICS})
        for name, c in per.items():
            if c is not None:
                total[name] = (total[name][0] + c[0], total[name][1] + c[1])
    header = "| run | " + " | ".join(title for _, title in METRICS) + " |"
    rule = "|---" * (len(METRICS) + 1) + "|"
    lines = ["EM [Wilson 95% interval over probes] and the probe count; — = no such probes.", "",
             header, rule]
    lines += [f"| {label} | " + " | ".join(cell(per[name]) for name, _ in METRICS) + " |" for label, per in rows]
    lines += ["", "Pooled per method over the runs above:", "", header.replace("| run |", "| method |"), rule]
    lines += [f"| {method} | " + " | ".join(cell(c if c[1] else None) for c in (tot[n] for n, _ in METRICS)) + " |"
              for method, tot in pooled.items()]
    return "\n".join(lines) + "\n"


@command("pool_probes")
def main(argv: list[str]) -> int:
    parser = Parser(prog="pool_probes.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    missing = [str(d) for d in args.run_dirs if not os.path.lexists(RunDir(d).results)]  # a bad one is read, refused
    if missing:
        raise BadInput(f"run_dirs: no results.json in {', '.join(missing)} (a finished main.py run directory)")
    text = table(args.run_dirs)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    exit_quietly(main())  # a stop signal during teardown must not kill a finished process
