"""Run a method x seed grid through main.py and tabulate the continual-learning metrics.

    uv run python scripts/compare.py --mode synthetic --methods full_ft,lora,smf,casm --seeds 0,1,2 \
        --run-root runs/compare-synthetic --out docs/results/synthetic [--set train.epochs=30 ...]

Each (method, seed) is one ordinary `main.py` run (same config, same budget: the --set overrides apply
to every method), so its run directory, checkpoints and results.json are the usual ones and a rerun
resumes or skips what is committed. The table is computed only from those results.json files and the
benchmark files each run directory holds; nothing is typed in by hand. `--no-run` only tabulates.

Written: <out>.md (the table, per-seed values, the exact commands) and <out>.json (all numbers).
Aggregates are mean, sample std and the 95% t-interval half-width (n - 1 degrees of freedom).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data.io import read_benchmark  # noqa: E402

# (key in results.json metrics or a derived name, column title)
COLUMNS = [
    ("plasticity_mean", "Plasticity"),
    ("stability_mean", "Stability"),
    ("temporal_recall_final", "Temporal recall (final)"),
    ("temporal_recall_mean", "Temporal recall (mean k)"),
    ("routing_accuracy", "Routing acc."),
    ("acc", "ACC"),
    ("forgetting", "Forgetting"),
    ("paraphrase_em_final", "Paraphrase EM"),
    ("formerly_true_dlogprob", "Δlogp formerly-true"),
]


def run_dirs(run_root: Path, method: str, seed: int) -> list[Path]:
    return sorted(d for d in run_root.glob(f"*-{method}-s{seed}-*") if (d / "results.json").exists())


def command(mode: str, method: str, seed: int, run_root: Path, sets: list[str], config: str | None) -> list[str]:
    cmd = ["uv", "run", "python", "main.py", "--mode", mode, "--method", method, "--seed", str(seed),
           "--run-root", str(run_root)]
    if config:
        cmd += ["--config", config]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def formerly_true_dlogprob(run_dir: Path, results: dict[str, Any]) -> float | None:
    """Mean gold log-prob gain over the base model on probes formerly true at the last period.

    Exact match is all-or-nothing; this shows whether an old value is still preferred more than
    before training even where greedy decoding no longer produces it.
    """
    bench = read_benchmark(run_dir / "data")
    names = bench.period_names
    index = {n: i + 1 for i, n in enumerate(names)}
    last = len(names)
    ids = {p.id for p in bench.all_probes() if not p.paraphrase and index[p.period] < last
           and p.valid_until is not None and index[p.valid_until] <= last}
    if not ids:
        return None

    def logprobs(k: int, name: str) -> dict[str, float]:
        path = run_dir / "periods" / f"{k}-{name}" / "eval" / "predictions.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return {r["id"]: r["logprob"] for r in rows if r["id"] in ids}

    base, final = logprobs(0, "base"), logprobs(last, names[-1])
    return float(np.mean([final[i] - base[i] for i in ids]))


def row_of(run_dir: Path) -> dict[str, Any]:
    results = json.loads((run_dir / "results.json").read_text())
    metrics = results["metrics"]
    out = {key: metrics.get(key) for key, _ in COLUMNS if key in metrics}
    last = results["periods"][-1]
    out["routing_accuracy"] = (results.get("method_extras", {}).get(last) or {}).get("routing_accuracy")
    out["formerly_true_dlogprob"] = formerly_true_dlogprob(run_dir, results)
    out["plasticity"] = metrics.get("plasticity")
    out["temporal_recall"] = metrics.get("temporal_recall")
    out["run_dir"] = str(run_dir)
    return out


def aggregate(values: list[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="synthetic", choices=["synthetic", "real"])
    ap.add_argument("--methods", default="full_ft,lora,smf,casm")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--run-root", required=True)
    ap.add_argument("--out", required=True, help="output path without extension (.md and .json are written)")
    ap.add_argument("--config", help="YAML config passed to main.py (default: configs/<mode>.yaml)")
    ap.add_argument("--set", action="append", default=[], help="override passed to every run")
    ap.add_argument("--no-run", action="store_true", help="only tabulate existing run directories")
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    run_root = Path(args.run_root)
    commands: list[str] = []
    timings: dict[str, float] = {}
    for method in methods:
        for seed in seeds:
            cmd = command(args.mode, method, seed, run_root, args.set, args.config)
            commands.append(shlex.join(cmd))
            if args.no_run:
                continue
            print(f"$ {shlex.join(cmd)}", file=sys.stderr, flush=True)
            start = time.time()
            proc = subprocess.run(cmd, cwd=REPO)
            timings[f"{method}/s{seed}"] = round(time.time() - start, 1)
            if proc.returncode != 0:
                print(f"{method} seed {seed}: main.py exited {proc.returncode}", file=sys.stderr)
                return proc.returncode

    table: dict[str, Any] = {"mode": args.mode, "seeds": seeds, "sets": args.set, "commands": commands,
                             "timings_s": timings, "methods": {}}
    for method in methods:
        rows = {}
        for seed in seeds:
            dirs = run_dirs(run_root, method, seed)
            if len(dirs) != 1:
                print(f"{method} seed {seed}: expected one finished run under {run_root}, found {len(dirs)}",
                      file=sys.stderr)
                continue
            rows[seed] = row_of(dirs[0])
        table["methods"][method] = {"per_seed": rows,
                                    "aggregate": {k: aggregate([r.get(k) for r in rows.values()])
                                                  for k, _ in COLUMNS}}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    lines = [f"Mode `{args.mode}`, seeds {seeds}; cells: mean ± sample std [± 95% t-interval half-width], "
             "exact match unless noted; — = not applicable / nothing to average.", "",
             "| method | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for method, data in table["methods"].items():
        cells = [fmt(data["aggregate"][k], 2 if k == "formerly_true_dlogprob" else 3) for k, _ in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Per seed (plasticity / stability / temporal recall final / routing accuracy):", ""]
    for method, data in table["methods"].items():
        for seed, r in sorted(data["per_seed"].items()):
            vals = [r.get(k) for k in ("plasticity_mean", "stability_mean", "temporal_recall_final",
                                       "routing_accuracy")]
            lines.append(f"- {method} s{seed}: " + " / ".join("—" if v is None else f"{v:.3f}" for v in vals))
    lines += ["", "Commands:", "", "```"] + commands + ["```", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
