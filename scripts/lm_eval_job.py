"""General-ability forgetting: lm-evaluation-harness tasks on every period checkpoint of a run.

    uv run --extra lm-eval python -m scripts.lm_eval_job RUN_DIR --tasks piqa,boolq,hellaswag
        [--period all|K|NAME] [--include-path DIR] [--no-default-tasks] [--limit N] [--num-fewshot N]
        [--batch-size 8] [--device auto|cpu|cuda] [--force]

Each period's model is rebuilt in memory exactly as training built it (training/period_model.py load_period_model:
the base model plus the period's trainable state, i.e. full weights for full_ft, base + adapter for
LoRA), wrapped in lm_eval's HFLM and passed to ``lm_eval.simple_evaluate``. Results go to
``periods/<k>-<name>/lm_eval/results.json`` with their own manifest (staged, committed by rename),
including each metric's ``higher_is_better`` as lm-eval declares it, so the report can show the
change relative to the base row (k = 0) and say which metrics are lower-is-better (perplexities,
bits per byte, CrowS-Pairs likelihood difference and pct_stereotype, ...).

A period whose lm_eval dir already holds the same tasks and settings is skipped (unless --force),
so a requeued job continues where it stopped. lm-eval is an optional dependency group
(``uv sync --extra lm-eval``). Offline clusters: pre-download the task datasets into the HF cache
and set HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1, or point --include-path at local task YAMLs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/lm_eval_job.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from scripts.command import (BadInput, Parser, check_stop, command, exit_quietly, prepare,  # noqa: E402
                             storage_refused, uninterruptible)

if __name__ == "__main__":
    prepare()  # quiet libraries, stop flag: before the imports below

from artifacts import (RunDir, StorageError, atomic_write_json, commit_dir, read_manifest, staging_dir,  # noqa: E402
                       verify_manifest, write_manifest)
from artifacts.rundir import LM_EVAL_FILE  # noqa: E402
from training.workload import read_workload  # noqa: E402

LM_EVAL_SCHEMA_VERSION = 1
# Used only when lm-eval does not declare a direction for a metric.
LOWER_IS_BETTER_FALLBACK = frozenset({"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                                      "likelihood_diff", "pct_stereotype", "ter"})


@dataclass
class LmEvalSettings:
    tasks: list[str] = field(default_factory=list)  # lm-eval task or group names
    num_fewshot: int | None = None  # None = each task's default
    limit: float | None = None  # examples per task (testing only; None = all)
    batch_size: int = 8
    include_path: list[str] = field(default_factory=list)  # extra task YAML directories
    include_defaults: bool = True  # index lm-eval's built-in tasks too
    bootstrap_iters: int = 0  # stderr bootstrap iterations for non-mean metrics (0 = skip)
    seed: int = 1234


def _require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ImportError("lm-eval is not installed: it is an optional dependency group, run "
                          "`uv sync --extra lm-eval` (or `uv run --extra lm-eval ...`)") from None
    return lm_eval


def parse_scores(res: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {metric: {value, stderr, higher_is_better}}} from simple_evaluate's output.

    lm-eval keys results as "<metric>,<filter>"; the filter is dropped when it is "none".
    """
    directions = res.get("higher_is_better") or {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, metrics in (res.get("results") or {}).items():
        entries: dict[str, dict[str, Any]] = {}
        for key, value in metrics.items():
            # metric keys are "<metric>,<filter>"; alias, name and sample_len are bookkeeping
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric},{filt}"
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            declared = (directions.get(task) or {}).get(metric)
            higher = bool(declared) if declared is not None else metric not in LOWER_IS_BETTER_FALLBACK
            entries[name] = {"value": float(value) if math.isfinite(value) else None,
                             "stderr": float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr)
                             else None,
                             "higher_is_better": higher}
        if entries:
            out[task] = entries
    return out


def _json_safe(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str, allow_nan=True).replace("NaN", "null"))


def evaluate_period(run_dir: Path, period: str | int, s: LmEvalSettings, device: str = "auto",
                    force: bool = False, task_manager: Any = None, log: Any = print) -> dict[str, Any] | None:
    """Run the tasks on one committed period and commit periods/<k>-<name>/lm_eval/; None if up to date."""
    from training.period_model import load_period_model

    lm_eval = _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    run = RunDir(run_dir)
    bench = read_workload(run.data)  # benchmark.json or a stream's stream.json
    k, name = run.resolve_period(["base"] + bench.period_names, period)
    final = run.lm_eval_dir(k, name)
    wanted = asdict(s)
    if not force and verify_manifest(final)[0] and (read_manifest(final) or {}).get("settings") == wanted:
        log(f"lm-eval {run_dir.name} {k}-{name}: up to date, skipped")
        return None
    started = time.time()
    pm = load_period_model(run_dir, k, device)
    lm = HFLM(pretrained=pm.model, tokenizer=pm.tokenizer, batch_size=s.batch_size)
    if task_manager is None:
        from lm_eval.tasks import TaskManager

        task_manager = TaskManager(include_path=s.include_path or None, include_defaults=s.include_defaults)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(s.tasks), num_fewshot=s.num_fewshot, limit=s.limit,
                                  task_manager=task_manager, bootstrap_iters=s.bootstrap_iters, log_samples=False,
                                  random_seed=s.seed, numpy_random_seed=s.seed, torch_random_seed=s.seed,
                                  fewshot_random_seed=s.seed)
    if res is None:  # non-zero rank in a distributed launch
        return None
    scores = parse_scores(res)
    result = {
        "schema_version": LM_EVAL_SCHEMA_VERSION, "run_id": run_dir.name, "method": pm.cfg.method.name,
        "period_index": k, "period_name": name, "settings": wanted, "lm_eval_version": lm_eval.__version__,
        "scores": scores,
        "raw": _json_safe({key: res.get(key) for key in ("results", "groups", "higher_is_better", "versions",
                                                          "n-shot", "n-samples")}),
        "elapsed_s": round(time.time() - started, 3),
    }
    tmp = staging_dir(final)
    try:
        atomic_write_json(tmp / LM_EVAL_FILE, result)
        parent = read_manifest(pm.directory) or {}
        write_manifest(tmp, {"kind": "lm_eval", "run_id": run_dir.name, "period_index": k, "period_name": name,
                             "settings": wanted, "trainable_sha256": parent.get("trainable_sha256")})
        with uninterruptible():  # a stop meanwhile takes effect before the next period
            commit_dir(tmp, final)
    except Exception as exc:
        # asked before the staging goes: removing it frees the space whose lack made the write fail
        refused = None if isinstance(exc, (BadInput, StorageError)) else storage_refused(exc, tmp.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if refused is not None:
            raise StorageError(refused, final) from exc
        raise
    except BaseException:  # a stop or Ctrl-C: the staging goes, the committed period is unchanged
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    brief = ", ".join(f"{t}/{m}={e['value']:.4g}" for t, ms in scores.items() for m, e in ms.items()
                      if e["value"] is not None)
    log(f"lm-eval {run_dir.name} {k}-{name}: {brief}")
    return result


def committed_prefix(run_dir: Path) -> list[int]:
    run = RunDir(run_dir)
    bench = read_workload(run.data)  # benchmark.json or a stream's stream.json
    return run.committed_prefix(["base"] + bench.period_names)  # a later period may still be training


@command("lm_eval")
def main(argv: list[str]) -> int:
    p = Parser(prog="python -m scripts.lm_eval_job", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task/group names, e.g. piqa,boolq")
    p.add_argument("--period", default="all", help="all (every committed period), an index (0 = base) or a name")
    p.add_argument("--include-path", action="append", default=[], help="directory of extra task YAMLs (repeatable)")
    p.add_argument("--no-default-tasks", action="store_true", help="index only --include-path tasks (faster)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--limit", type=float, help="examples per task; for smoke tests only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bootstrap-iters", type=int, default=0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--force", action="store_true", help="recompute periods that are already done")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    run_dir = Path(args.run_dir)
    if not tasks:
        raise BadInput("--tasks names no task")
    if not run_dir.is_dir():
        raise BadInput(f"{run_dir} is not a directory (give a run directory, e.g. runs/<run-id>)")
    try:
        _require_lm_eval()
    except ImportError as exc:
        raise BadInput(str(exc)) from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    s = LmEvalSettings(tasks=tasks, num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size,
                       include_path=[str(Path(x).resolve()) for x in args.include_path],
                       include_defaults=not args.no_default_tasks, bootstrap_iters=args.bootstrap_iters, seed=args.seed)
    from training.period_model import load_run_config

    load_run_config(run_dir)  # a config.yaml that is not one: one line here, not a traceback later
    if args.period == "all":
        targets: list[int | str] = list(committed_prefix(run_dir))
    else:
        names = ["base"] + read_workload(RunDir(run_dir).data).period_names
        targets = [RunDir.resolve_period(names, args.period)[0]]
    if not targets:
        raise BadInput(f"{run_dir} has no committed period yet")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=s.include_path or None, include_defaults=s.include_defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise BadInput(f"unknown lm-eval task(s) {unknown}; see `lm-eval ls tasks` or pass --include-path")
    for k in targets:
        check_stop()
        evaluate_period(run_dir, k, s, args.device, args.force, task_manager=tm)
    return 0


if __name__ == "__main__":
    exit_quietly(main())  # a stop signal during teardown must not kill a finished process
