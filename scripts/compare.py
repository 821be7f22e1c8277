"""Run a method x seed grid through main.py and tabulate the continual-learning metrics and costs.

    uv run python scripts/compare.py --mode synthetic --methods full_ft,lora,smf,casm --seeds 0,1,2 \
        --run-root runs/compare-synthetic --out docs/results/synthetic [--set train.epochs=30 ...]
    uv run python scripts/compare.py --mode synthetic --stream configs/streams/multidomain-synthetic.yaml \
        --methods "lora,ewc,replay,lora[train.optimizer=casmo]" --run-root runs/cmp --out runs/cmp/table

Each (method, seed) is one ordinary `main.py` run (same config, same budget: the --set overrides apply
to every method), so its run directory, checkpoints and results.json are the usual ones and a rerun
resumes or skips what is committed. A method may carry its own overrides in brackets, `name[a.b=v,...]`
(an optimizer choice, a method option); each such variant runs under its own subdirectory of the run
root. The table is computed only from those results.json files and the data each run directory holds;
nothing is typed in by hand. `--no-run` only tabulates. Bounds (joint, per_task) are labelled as such.

Written: <out>.md (the table, per-seed values, the exact commands) and <out>.json (all numbers).
Aggregates are mean, sample std and the 95% t-interval half-width (n - 1 degrees of freedom).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python scripts/compare.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO))

from scripts.command import BadInput, Parser, exit_quietly, prepare, uninterruptible  # noqa: E402
from scripts.command import command as under_contract  # noqa: E402  (compare has its own command())

if __name__ == "__main__":
    prepare()  # quiet libraries, stop flag: before the imports below

import numpy as np  # noqa: E402
from scipy import stats  # noqa: E402

from artifacts import RunDir, UnreadableFileError, read_jsonl, read_regular_text  # noqa: E402
from data.io import read_benchmark  # noqa: E402

# (key in results.json metrics or a derived name, column title)
# Every temporal column names its probe family (storage: a trained sentence's cloze; extraction: a
# wording never trained on); the two are never mixed (docs/metrics.md).
COLUMNS = [
    ("plasticity_storage_pooled", "Plasticity storage"),
    ("plasticity_extraction_pooled", "Plasticity extraction"),
    ("stability_storage_pooled", "Stability storage"),
    ("stability_extraction_pooled", "Stability extraction"),
    ("temporal_recall_storage_final", "Temporal recall storage (final)"),
    ("temporal_recall_extraction_final", "Temporal recall extraction (final)"),
    ("routing_accuracy", "Routing acc."),
    ("acc_storage", "ACC storage"),
    ("forgetting_storage", "Forgetting storage"),
    ("acc_extraction", "ACC extraction"),
    ("formerly_true_dlogprob", "Δlogp formerly-true (storage)"),
]


# a task stream's columns: higher-is-better task metrics, then the lower-is-better (NLL) ones apart
STREAM_COLUMNS = [
    ("higher_is_better_summary.acc", "ACC"),
    ("higher_is_better_summary.bwt", "BWT"),
    ("higher_is_better_summary.forgetting", "Forgetting"),
    ("higher_is_better_summary.plasticity", "Plasticity"),
    ("higher_is_better_summary.max_drop", "Max drop"),
    ("lower_is_better_summary.final", "NLL final ↓"),
    ("lower_is_better_summary.bwt", "NLL BWT ↓"),
    ("lower_is_better_summary.learning", "NLL learning ↓"),
]
# what each run cost (results.json "cost"; replay's buffer from its eval extras)
COST_COLUMNS = [
    ("cost.train_seconds", "train s"),
    ("cost.peak_memory_mib", "peak MiB"),
    ("cost.checkpoint_kib", "ckpt KiB"),
    ("replay_kib", "replay KiB"),
]


def parse_variants(spec: str) -> list[tuple[str, str, list[str]]]:
    """`lora,lora[train.optimizer=casmo,train.lr=1e-3]` -> (label, method, overrides) per entry."""
    out, depth, start = [], 0, 0
    parts = []
    for i, ch in enumerate(spec + ","):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(spec[start:i].strip())
            start = i + 1
    for part in filter(None, parts):
        name, _, rest = part.partition("[")
        sets = [x.strip() for x in rest.rstrip("]").split(",") if x.strip()]
        out.append((part, name.strip(), sets))
    return out


def variant_root(run_root: Path, label: str, sets: list[str]) -> Path:
    if not sets:
        return run_root
    return run_root / "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def run_dirs(run_root: Path, method: str, seed: int) -> list[Path]:
    # lexists: a results.json that is a FIFO or a link loop is a finished run whose file is bad (read, refused)
    return sorted(d for d in run_root.glob(f"*-{method}-s{seed}-*") if os.path.lexists(RunDir(d).results))


def command(mode: str, method: str, seed: int, run_root: Path, sets: list[str], config: str | None,
            stream: str | None = None) -> list[str]:
    cmd = ["uv", "run", "python", "main.py", "--mode", mode, "--method", method, "--seed", str(seed),
           "--run-root", str(run_root)]
    if config:
        cmd += ["--config", config]
    if stream:
        cmd += ["--stream", stream]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _dotted(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict):
            return None
        tree = tree.get(part)
    return tree


def formerly_true_dlogprob(run_dir: Path, results: dict[str, Any]) -> float | None:
    """Mean gold log-prob gain over the base model on probes formerly true at the last period.

    Exact match is all-or-nothing; this shows whether an old value is still preferred more than
    before training even where greedy decoding no longer produces it.
    """
    run = RunDir(run_dir)
    bench = read_benchmark(run.data)
    names = bench.period_names
    index = {n: i + 1 for i, n in enumerate(names)}
    last = len(names)
    ids = {p.id for p in bench.all_probes() if p.family == "storage" and index[p.period] < last
           and p.valid_until is not None and index[p.valid_until] <= last}
    if not ids:
        return None

    def logprobs(k: int, name: str) -> dict[str, float]:
        path = run.predictions(k, name)
        try:
            rows = read_jsonl(path)
            found = {r["id"]: float(r["logprob"]) for r in rows if r["id"] in ids}
        except FileNotFoundError:
            raise UnreadableFileError(f"{path}: missing") from None
        except (ValueError, TypeError, KeyError) as exc:  # UnreadableFileError is a ValueError
            raise UnreadableFileError(f"{path}: not the predictions main.py writes "
                                      f"({' '.join(str(exc).split())[:120]})") from None
        if set(found) != ids:
            raise UnreadableFileError(f"{path}: {len(ids - set(found))} of the run's probes have no prediction")
        return found

    base, final = logprobs(0, "base"), logprobs(last, names[-1])
    return float(np.mean([final[i] - base[i] for i in ids]))


def read_results(run_dir: Path) -> dict[str, Any]:
    """results.json as main.py writes it (an object with metrics and a non-empty list of periods), else
    UnreadableFileError: one line, exit 65, nothing written."""
    path = RunDir(run_dir).results
    try:
        results = json.loads(read_regular_text(path))
    except UnreadableFileError:
        raise
    except ValueError as exc:
        raise UnreadableFileError(f"{path}: not valid JSON ({str(exc)[:80]})") from None
    if not (isinstance(results, dict) and isinstance(results.get("metrics"), dict)
            and isinstance(results.get("periods"), list) and results["periods"]):
        raise UnreadableFileError(f"{path}: not a results object (metrics, periods) as main.py writes it")
    return results


def cost_of(results: dict[str, Any]) -> dict[str, Any]:
    cost = results.get("cost") if isinstance(results.get("cost"), dict) else {}
    extras = results.get("method_extras") if isinstance(results.get("method_extras"), dict) else {}
    last = extras.get(str(results["periods"][-1])) or {}
    last = last if isinstance(last, dict) else {}
    return {"cost.train_seconds": cost.get("train_seconds"),
            "cost.peak_memory_mib": cost["peak_memory_bytes"] / 2**20 if "peak_memory_bytes" in cost else None,
            "cost.checkpoint_kib": cost["checkpoint_bytes"] / 1024 if "checkpoint_bytes" in cost else None,
            "replay_kib": last["replay_bytes"] / 1024 if "replay_bytes" in last else None}


def stream_row_of(run_dir: Path) -> dict[str, Any]:
    results = read_results(run_dir)
    out = {key: _dotted(results["metrics"], key) for key, _ in STREAM_COLUMNS}
    out.update(cost_of(results))
    out["is_bound"] = bool(results.get("is_bound"))
    out["run_dir"] = str(run_dir)
    return out


def row_of(run_dir: Path) -> dict[str, Any]:
    results = read_results(run_dir)
    metrics = results["metrics"]
    out = {key: metrics.get(key) for key, _ in COLUMNS if key in metrics}
    out.update(cost_of(results))
    out["is_bound"] = bool(results.get("is_bound"))
    last = results["periods"][-1]
    extras = results.get("method_extras") if isinstance(results.get("method_extras"), dict) else {}
    out["routing_accuracy"] = (extras.get(last) or {}).get("routing_accuracy") \
        if isinstance(extras.get(last), dict) else None
    out["formerly_true_dlogprob"] = formerly_true_dlogprob(run_dir, results)
    out["plasticity_storage"] = metrics.get("plasticity_storage")
    out["temporal_recall_storage"] = metrics.get("temporal_recall_storage")
    out["run_dir"] = str(run_dir)
    return out


def aggregate(values: list[Any]) -> dict[str, Any]:
    vals = [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    if not vals:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    n = len(vals)
    mean = float(np.mean(vals))
    std = float(np.std(vals, ddof=1)) if n > 1 else None
    ci = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "ci95": ci}


def fmt(agg: dict[str, Any], digits: int = 3) -> str:
    if agg["mean"] is None:
        return "—"
    text = f"{agg['mean']:.{digits}f}"
    if agg["std"] is not None:
        text += f" ± {agg['std']:.{digits}f} [±{agg['ci95']:.{digits}f}]"
    return text


def parse_seeds(text: str) -> list[int]:
    """--seeds: comma-separated integers, e.g. 0,1,2."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a seed")
    return seeds


def run_child(cmd: list[str]) -> int:
    """One main.py run. A stop of this command is passed on to it (main.py then saves a step checkpoint and
    exits 75) and waited for, so the table's run is resumable, not killed mid-step."""
    if cmd[:2] == ["uv", "run"] and shutil.which("uv") is None:  # the recorded command stays the uv one
        cmd = [sys.executable, *cmd[3:]]
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        return proc.wait()
    except BaseException:
        with uninterruptible():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=600)
                except subprocess.TimeoutExpired:
                    proc.kill()
        raise


@under_contract("compare")
def main(argv: list[str]) -> int:
    ap = Parser(prog="compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="synthetic", choices=["synthetic", "real"])
    ap.add_argument("--methods", default="full_ft,lora,smf,casm", help="comma-separated; name[a.b=v,...] adds "
                    "overrides for that entry only")
    ap.add_argument("--seeds", default=[0, 1, 2], type=parse_seeds, help="comma-separated integers (default 0,1,2)")
    ap.add_argument("--stream", help="a task stream YAML passed to main.py (default: the temporal benchmark)")
    ap.add_argument("--run-root", required=True)
    ap.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    ap.add_argument("--config", help="YAML config passed to main.py (default: configs/<mode>.yaml)")
    ap.add_argument("--set", action="append", default=[], help="override passed to every run")
    ap.add_argument("--no-run", action="store_true", help="only tabulate existing run directories")
    args = ap.parse_args(argv)
    variants = parse_variants(args.methods)
    if not variants or any(not method for _, method, _ in variants):
        raise BadInput(f"--methods {args.methods!r}: give method names, e.g. lora,ewc or lora[train.lr=1e-3]")
    seeds = args.seeds
    run_root = Path(args.run_root)
    if args.no_run and not run_root.is_dir():
        raise BadInput(f"--run-root {run_root} does not exist or is not a directory; --no-run only tabulates "
                       "existing runs")
    columns = (STREAM_COLUMNS if args.stream else COLUMNS) + COST_COLUMNS
    read_row = stream_row_of if args.stream else row_of
    commands: list[str] = []
    timings: dict[str, float] = {}
    for label, method, sets in variants:
        for seed in seeds:
            cmd = command(args.mode, method, seed, variant_root(run_root, label, sets), args.set + sets,
                          args.config, args.stream)
            commands.append(shlex.join(cmd))
            if args.no_run:
                continue
            print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
            start = time.time()
            returncode = run_child(cmd)
            timings[f"{label}/s{seed}"] = round(time.time() - start, 1)
            if returncode != 0:
                print(f"error: {label} seed {seed}: main.py exited {returncode}", file=sys.stderr)
                return returncode

    found = 0
    table: dict[str, Any] = {"mode": args.mode, "stream": args.stream, "seeds": seeds, "sets": args.set,
                             "commands": commands, "timings_s": timings, "methods": {}}
    unmatched = []
    for label, method, sets in variants:
        rows = {}
        for seed in seeds:
            dirs = run_dirs(variant_root(run_root, label, sets), method, seed)
            if len(dirs) != 1:
                unmatched.append(f"{label} seed {seed} ({len(dirs)} found)")
                continue
            rows[seed] = read_row(dirs[0])
            found += 1
        bound = any(r.get("is_bound") for r in rows.values())
        table["methods"][label] = {"per_seed": rows, "is_bound": bound,
                                   "aggregate": {k: aggregate([r.get(k) for r in rows.values()])
                                                 for k, _ in columns}}

    if not found:
        raise BadInput(f"no finished run under {run_root} for any of the methods and seeds asked for "
                       f"({', '.join(unmatched)}); nothing to tabulate")
    if unmatched:  # one line, not one per cell: the table is still written, with these cells empty
        print(f"warning: expected one finished run each, left out of the table: {', '.join(unmatched)}",
              file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    what = f"stream `{args.stream}`" if args.stream else "the temporal benchmark"
    lines = [f"Mode `{args.mode}`, {what}, seeds {seeds}; cells: mean ± sample std [± 95% t-interval "
             "half-width]; — = not applicable / nothing to average; (bound) = a reference point, not a method.",
             "", "| method | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for label, data in table["methods"].items():
        digits = {"formerly_true_dlogprob": 2, "cost.train_seconds": 0, "cost.peak_memory_mib": 0,
                  "cost.checkpoint_kib": 0, "replay_kib": 1}
        cells = [fmt(data["aggregate"][k], digits.get(k, 3)) for k, _ in columns]
        lines.append(f"| {label}{' (bound)' if data['is_bound'] else ''} | " + " | ".join(cells) + " |")
    first = [k for k, _ in columns[:4]]
    lines += ["", f"Per seed ({' / '.join(t for _, t in columns[:4])}):", ""]
    for label, data in table["methods"].items():
        for seed, r in sorted(data["per_seed"].items()):
            vals = [r.get(k) for k in first]
            lines.append(f"- {label} s{seed}: " + " / ".join("—" if v is None else f"{v:.3f}" for v in vals))
    lines += ["", "Commands:", "", "```"] + commands + ["```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    exit_quietly(main())  # a stop signal during teardown must not kill a finished process
