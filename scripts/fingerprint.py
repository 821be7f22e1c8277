"""Fingerprint what every method produces, to show a refactoring is bit-for-bit neutral.

    uv run python scripts/fingerprint.py run --run-root /tmp/fp-before --out /tmp/fp-before.json
    (change the code)
    uv run python scripts/fingerprint.py run --run-root /tmp/fp-after --out /tmp/fp-after.json
    uv run python scripts/fingerprint.py diff /tmp/fp-before.json /tmp/fp-after.json

`run` trains every registered method through the synthetic temporal benchmark and lora through one task
stream (configs/streams/multidomain-synthetic.yaml), each an ordinary `main.py` run in synthetic mode, and
writes for each run: its run id (the pinned identity of its config), the final state's sha256 as
results.json records it, the sha256 of every file under each period's eval/ directory (the predictions
and scores), and results.json's `metrics` block. Timings and paths are left out: they change between two
runs of the same code. `diff` prints every difference and exits 1 if there is one, 0 if the two are
identical.

`--methods` narrows the list (a refactoring that touches one method can check it alone first).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/fingerprint.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

STREAM = "configs/streams/multidomain-synthetic.yaml"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fingerprint_run(run_dir: Path) -> dict[str, Any]:
    """What a run produced that must not change under a refactoring (no timings, no absolute paths)."""
    results = json.loads((run_dir / "results.json").read_text())
    eval_files: dict[str, str] = {}
    for period in sorted((run_dir / "periods").iterdir()):
        eval_dir = period / "eval"
        if eval_dir.is_dir():
            for f in sorted(p for p in eval_dir.rglob("*") if p.is_file()):
                eval_files[str(f.relative_to(run_dir))] = _sha256(f)
    return {
        "run_id": run_dir.name,
        "final_state_sha256": results.get("final_state_sha256"),
        "eval_files": eval_files,
        "metrics": results.get("metrics"),
    }


def _main_py(args: list[str], run_root: Path) -> None:
    cmd = [sys.executable, str(REPO_ROOT / "main.py"), "--mode", "synthetic", "--run-root", str(run_root),
           "--set", "train.progress=false", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONHASHSEED": "0"})


def _run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if (p / "results.json").is_file())


def run(run_root: Path, out: Path, methods: list[str], stream: bool) -> None:
    from training.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"fingerprint: unknown method(s) {unknown}; known: {sorted(METHODS)}")
    for method in methods:
        _main_py(["--method", method], run_root / "temporal")
    if stream:
        _main_py(["--method", "lora", "--stream", STREAM], run_root / "stream")
    runs: dict[str, Any] = {}
    for kind in ("temporal", "stream"):
        if (run_root / kind).is_dir():
            for d in _run_dirs(run_root / kind):
                runs[f"{kind}/{d.name.rsplit('-', 1)[0]}"] = fingerprint_run(d)
    out.write_text(json.dumps(runs, indent=1, sort_keys=True) + "\n")
    print(f"fingerprint: {len(runs)} runs -> {out}")


def _differences(a: Any, b: Any, where: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                found.append(f"{where}/{key}: only in {'after' if key in b else 'before'}")
            else:
                found += _differences(a[key], b[key], f"{where}/{key}")
        return found
    return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


def diff(before: Path, after: Path) -> int:
    found = _differences(json.loads(before.read_text()), json.loads(after.read_text()), "")
    for line in found[:200]:
        print(line)
    print(f"fingerprint: {len(found)} difference(s)" if found else "fingerprint: identical")
    return 1 if found else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train every method (synthetic) and one stream, write the fingerprint")
    r.add_argument("--run-root", type=Path, required=True)
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--methods", default="", help="comma-separated (default: every registered method)")
    r.add_argument("--no-stream", action="store_true")
    d = sub.add_parser("diff", help="compare two fingerprints; exit 1 on any difference")
    d.add_argument("before", type=Path)
    d.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.cmd == "diff":
        return diff(args.before, args.after)
    from training.methods import METHODS

    methods = [m for m in args.methods.split(",") if m] or sorted(METHODS)
    run(args.run_root, args.out, methods, stream=not args.no_stream)
    return 0


if __name__ == "__main__":
    sys.exit(main())
