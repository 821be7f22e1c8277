"""A stand-in for main.py that keeps its process contract and nothing else, in well under a second.

Used by the fast tests of run_job.sh and scripts/status.py (tests/slurm/test_local_tools.py and
tests/slurm/test_wrapper_on_slurm.py), where what matters is the exit codes, the signals and the run
directory layout, not training. It writes the same layout as main.py (docs/design.md) with
artifacts.write_manifest, so status.py reads it the way it reads a real run. The real-Slurm tests use
the real main.py.

Contract kept: exit 0 when every period is committed; 2 on bad input; 75 after SIGUSR1/SIGUSR2/SIGTERM,
having saved a step checkpoint at the next step boundary; resuming from the newest step checkpoint;
restart_count from SLURM_RESTART_COUNT in every manifest; a "resume" record in train_log.jsonl.
Knobs: --set train.step_sleep=S, --set train.steps=N (steps per period), --set train.fail_at=K:S
(raise at period K step S, for the error column of status.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, for artifacts/

from artifacts import atomic_write_json, read_manifest, verify_manifest, write_manifest  # noqa: E402

PERIODS = ["2018", "2020", "2022", "2024"]
_stop: list[str] = []


def _handle(signum: int, frame: object) -> None:
    _stop.append(signal.Signals(signum).name)


def slurm_fields() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return {"slurm_job_id": job, "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)}


def log(run: Path, record: dict) -> None:
    with open(run / "train_log.jsonl", "a") as fh:
        fh.write(json.dumps(record, sort_keys=True) + "\n")


def main() -> int:
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, _handle)
    p = argparse.ArgumentParser()
    for flag in ("--method", "--mode", "--config", "--benchmark", "--run-id"):
        p.add_argument(flag)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-root", default="runs")
    p.add_argument("--set", action="append", default=[])
    args = p.parse_args()
    sets = dict(s.split("=", 1) for s in args.set)
    if not args.method or args.method.startswith("bad"):
        print(f"error: method.name: unknown method '{args.method}'; valid: lora, casm", file=sys.stderr)
        return 2
    steps = int(sets.get("train.steps", "6"))
    sleep = float(sets.get("train.step_sleep", "0"))
    fail_at = tuple(int(x) for x in sets["train.fail_at"].split(":")) if "train.fail_at" in sets else None
    run = Path(args.run_root) / f"standin-{args.method}-s{args.seed}"
    (run / "periods").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"method:\n  name: {args.method}\nseed: {args.seed}\n"
                                     f"data:\n  periods: {json.dumps(PERIODS)}\n")
    atomic_write_json(run / "run.json", {"run_id": run.name, **slurm_fields()})
    print(f"run {run}  method={args.method}", file=sys.stderr)
    state = hashlib.sha256(f"{args.method}-{args.seed}".encode())
    for k, name in enumerate(["base", *PERIODS]):
        pdir = run / "periods" / f"{k}-{name}"
        if verify_manifest(pdir)[0]:
            state.update(f"{k}".encode())
            continue
        start = 0
        ckroot = run / "checkpoints" / f"{k}-{name}"
        saved = sorted(ckroot.glob("step-*")) if ckroot.is_dir() else []
        if k and saved and verify_manifest(saved[-1])[0]:
            start = int(saved[-1].name.split("-")[1])
            log(run, {"event": "resume", "period": k, "from_step": start, **slurm_fields()})
        for step in range(start + 1, (steps if k else 0) + 1):
            if fail_at == (k, step):
                raise RuntimeError(f"injected failure at period {k} step {step}")
            log(run, {"event": "train", "period": k, "step": step})
            time.sleep(sleep)
            if _stop:
                sdir = ckroot / f"step-{step:06d}"
                sdir.mkdir(parents=True, exist_ok=True)
                (sdir / "trainer_state.json").write_text(json.dumps({"step": step}))
                write_manifest(sdir, {"run_id": run.name, "period_index": k, "period_name": name,
                                      **slurm_fields()})
                print(f"stopped: {_stop[0]} during period {k} at step {step}", file=sys.stderr)
                return 75
        pdir.mkdir(parents=True, exist_ok=True)
        (pdir / "scores.json").write_text(json.dumps({"k": k}))
        write_manifest(pdir, {"kind": "period", "status": "complete", "run_id": run.name, "method": args.method,
                              "period_index": k, "period_name": name, **slurm_fields()})
        state.update(f"{k}".encode())
        log(run, {"event": "eval", "period": k})
    assert read_manifest(run / "periods" / f"{len(PERIODS)}-{PERIODS[-1]}") is not None
    atomic_write_json(run / "results.json", {"run_id": run.name, "method": args.method, "periods": PERIODS,
                                             "final_state_sha256": state.hexdigest(),
                                             "metrics": {"matrix_storage_em": [[0.0] * len(PERIODS)]}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
