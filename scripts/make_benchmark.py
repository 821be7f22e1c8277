"""Write a benchmark to a directory and print what each period holds.

    uv run python scripts/make_benchmark.py --out DIR [--seed N] [--num-facts N]
                                            [--benchmark temporalwiki|PATH]

With the default --benchmark temporalwiki it generates Synthetic TemporalWiki from the data-section
defaults (plus --seed/--num-facts); with a path (e.g. a CASM synthetic_facts_raw.json) it converts
that file into this project's layout. Exit code 2 with one line on stderr on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# scripts/ is not a package; make the repository root importable when run as a file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data import DataConfig, DataError, load_benchmark, write_benchmark  # noqa: E402
from data.build import count_summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="directory to write benchmark.json to")
    parser.add_argument("--seed", type=int, default=DataConfig.seed, help="generator seed")
    parser.add_argument("--num-facts", type=int, default=DataConfig.num_facts,
                        help="number of (subject, relation) facts to generate")
    parser.add_argument("--benchmark", default="temporalwiki",
                        help="'temporalwiki' (generate) or a path to convert")
    args = parser.parse_args(argv)

    cfg = DataConfig(benchmark=args.benchmark, seed=args.seed, num_facts=args.num_facts)
    try:
        bench = load_benchmark(args.benchmark, cfg)
    except DataError as exc:
        for line in getattr(exc, "problems", None) or [str(exc)]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    for line in bench.meta.get("warnings", []):
        print(f"warning: {line}", file=sys.stderr)
    path = write_benchmark(bench, args.out)

    print(f"{path}  name={bench.name}  fingerprint={bench.fingerprint[:16]}")
    header = f"{'period':>8} {'passages':>9} {'facts':>6} {'new':>5} {'changed':>8} " \
             f"{'unchanged':>10} {'extraction':>11} {'probes':>7}"
    print(header)
    for period in bench.periods:
        row = count_summary([period])[period.name]
        print(f"{period.name:>8} {row['passages']:>9} {row['trained_facts']:>6} {row['new']:>5} "
              f"{row['changed']:>8} {row['unchanged']:>10} {row['extraction']:>11} "
              f"{len(period.probes):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
