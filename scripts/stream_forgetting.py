"""Forgetting of every task of stream runs, with 95% paired bootstrap intervals over the task's items.

    uv run python scripts/stream_forgetting.py RUN_DIR [RUN_DIR ...] [--json PATH]

For task j of a stream run and each metric of its scorer, forgetting is the loss between the row after
task j was trained (row j) and the last row (after every task):

    forgetting_j = value_j - value_T    (higher-is-better metrics; value_T - value_j for lower-is-better)

so a positive number is ability lost in both directions of metric (for perplexity tasks: nats per token
gained). This is the per-task "final" forgetting of the score matrix's column j (docs/metrics.md); its
interval is the 95% paired percentile bootstrap over the task's eval items (the same resampled items in
both rows, seeded: eval_and_metrics/retention.py's `task_retention`, which the retention track uses for its
drop against the base row). Runs of one stream preset and data seed score the same items, so two
methods' numbers are paired over items; where two runs' intervals do not overlap, the methods differ on
those items beyond resampling noise (a statement about these items and this training seed, not over seeds).

Read from each run's committed files only: run.json (the tasks), periods/<k>-<task>/eval/predictions.jsonl
and results.json's metrics.scorers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/stream_forgetting.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from scripts.command import BadInput, Parser, command, exit_quietly, prepare  # noqa: E402

if __name__ == "__main__":
    prepare()

from artifacts import RunDir, UnreadableFileError, read_jsonl, read_regular_text  # noqa: E402


def _read_json(path: Path) -> Any:
    try:
        return json.loads(read_regular_text(path))
    except (UnreadableFileError, ValueError) as exc:
        raise BadInput(f"{path}: {exc}; is this a finished stream run directory?") from None


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        return read_jsonl(path)
    except (UnreadableFileError, FileNotFoundError) as exc:
        raise BadInput(f"{path}: {exc}") from None


def run_forgetting(run_dir: Path) -> dict[str, Any]:
    """{"method", "tasks": {task: {metric: {"after_task", "final", "forgetting", "ci", "higher_is_better"}}}}."""
    from eval_and_metrics.retention import task_retention
    from eval_and_metrics.scorers import SCORERS
    from eval_and_metrics.stream_metrics import rows_by_task

    run = RunDir(run_dir)
    results = _read_json(run.results)
    scorers = results.get("metrics", {}).get("scorers")
    if not isinstance(scorers, dict) or not scorers:
        raise BadInput(f"{run_dir}: results.json has no metrics.scorers: not a stream run")
    # the task order is the rows' order (periods/<k>-<task>); results.json's mappings are sorted by name
    periods = dict(run.period_entries())
    if sorted(periods) != list(range(len(scorers) + 1)):
        raise BadInput(f"{run_dir}: {len(periods)} committed rows for {len(scorers)} tasks; finish the run first")
    row_names = [periods[k].name.split("-", 1)[1] for k in range(len(periods))]  # "base" first
    names = row_names[1:]
    if set(names) != set(scorers):
        raise BadInput(f"{run_dir}: the rows name tasks {names}, results.json {sorted(scorers)}")
    per_row = [rows_by_task(names, _rows(run.predictions(k, row_name))) for k, row_name in enumerate(row_names)]
    out: dict[str, Any] = {"run": run_dir.name, "method": results.get("method"), "tasks": {}}
    for j, name in enumerate(names[:-1], start=1):  # the last task has nothing trained after it
        scorer = SCORERS[scorers[name]["name"]]()  # aggregate only: the constructor defaults suffice
        kept = task_retention(scorer, [per_row[j][name], per_row[-1][name]])
        out["tasks"][name] = {metric: {"after_task": e["per_row"][0], "final": e["per_row"][1],
                                       "forgetting": e["drop"][1], "ci": e["drop_ci"][1],
                                       "higher_is_better": e["higher_is_better"]}
                              for metric, e in kept["metrics"].items()}
        out["tasks"][name]["n"] = kept["n"]
    return out


def _fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


@command("stream_forgetting")
def main(argv: list[str]) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished stream run directories")
    parser.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = parser.parse_args(argv)
    found = [run_forgetting(d) for d in args.runs]
    print("| run | task | metric | after its training | after the last task | forgetting [95% items] | n |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in found:
        for task, metrics in run["tasks"].items():
            n = metrics["n"]
            for metric, e in metrics.items():
                if metric == "n":
                    continue
                lo, hi = e["ci"]
                print(f"| {run['run']} | {task} | {metric} | {_fmt(e['after_task'])} | {_fmt(e['final'])} | "
                      f"{_fmt(e['forgetting'])} [{_fmt(lo)}, {_fmt(hi)}] | {n} |")
    if args.json:
        args.json.write_text(json.dumps(found, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    exit_quietly(main())  # a stop signal during teardown must not kill a finished process
