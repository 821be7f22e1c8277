"""One run on two Slurm tasks (two CPU ranks, gloo) through run_job.sh, preempted and requeued.

`sbatch --ntasks=2 run_job.sh lora` starts one rank per task with srun; both meet on the first node of
the allocation (MASTER_ADDR/MASTER_PORT from run_job.sh). `scontrol requeue` mid-period sends SIGTERM
to both ranks: they agree to stop at the same step boundary, rank 0 saves a step checkpoint, all exit
75, Slurm requeues the job, and the restarted job resumes. With train.grad_accum equal to the number
of ranks the result is bit for bit that of one uninterrupted process (docs/distributed.md), which runs
here at the same time, outside Slurm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import comparable, main_cmd, only_run_dir, read_results

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--set", "train.epochs=2", "--set", "train.threads=1", "--set", "train.progress=false",
        "--set", "train.grad_accum=2", "--set", "checkpoint.every_steps=1"]
SLOW = ["--set", "train.step_sleep=1.0"]  # time to hit period 2 mid-training; not part of the run id
PREEMPT_PERIOD = 2


def train_rows(run_root: Path) -> list[dict]:
    dirs = [d for d in run_root.iterdir() if d.is_dir()] if run_root.is_dir() else []
    log = dirs[0] / "train_log.jsonl" if dirs else None
    if log is None or not log.exists():
        return []
    rows = []
    for line in log.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break  # a line being written right now
    return rows


def test_two_rank_job_requeued_mid_period_ends_like_one_uninterrupted_process(slurm: SlurmCluster,
                                                                              tmp_path: Path) -> None:
    config = tmp_path / "synthetic.yaml"  # frozen: the run id hashes the config
    config.write_text((REPO / "configs" / "synthetic.yaml").read_text())
    (tmp_path / "logs").mkdir()
    run_root = tmp_path / "ranks"
    env = {"MODE": "synthetic", "RUN_ROOT": str(run_root), "SEED": "0", "CONFIG": str(config),
           "ENV_CMD": f"env OMP_WAIT_POLICY=PASSIVE PATH={Path(sys.executable).parent}:{os.environ['PATH']}"}
    job_id = slurm.sbatch("--ntasks=2", "--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=20",
                          "--job-name=clkit-ranks", str(REPO / "run_job.sh"), "lora", *ARGS, *SLOW,
                          env=env, cwd=tmp_path)
    # The reference: one process, no Slurm, same config, while the job runs.
    ref_root = tmp_path / "reference"
    reference = subprocess.Popen(main_cmd("--method", "lora", "--mode", "synthetic", "--seed", "0",
                                          "--config", str(config), "--run-root", str(ref_root), *ARGS),
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"})
    log_path = tmp_path / "logs" / f"clkit-ranks-{job_id}.out"

    def progressed() -> bool:
        return any(r.get("event") == "train" and r.get("period") == PREEMPT_PERIOD and r.get("step", 0) >= 1
                   for r in train_rows(run_root))

    slurm.wait_for(f"job {job_id} to train period {PREEMPT_PERIOD}", progressed, timeout_s=300, poll_s=0.2)
    stopped_at = max(r["step"] for r in train_rows(run_root)
                     if r.get("event") == "train" and r.get("period") == PREEMPT_PERIOD)
    slurm.run("scontrol", "requeue", job_id)  # SIGTERM to every task of the step, then Slurm requeues
    slurm.release_when_requeued(job_id)
    final = slurm.wait_done(job_id, timeout_s=300)
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out[-3000:]

    log = log_path.read_text() if log_path.exists() else f"(no log at {log_path})"
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) >= 1, f"{final}\n{log}"
    assert log.count("run_job.sh: world: 2 ranks on 1 node(s)") == 2, log  # once per attempt
    assert "stopped on SIGTERM" in log, log  # all ranks exited 75; Slurm requeued, run_job.sh did not
    run = only_run_dir(run_root)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    rows = train_rows(run_root)
    resumes = [r for r in rows if r["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["period"] == PREEMPT_PERIOD, resumes
    assert stopped_at <= resumes[0]["from_step"] < resumes[0]["total_steps"], (stopped_at, resumes)
    steps = [r["step"] for r in rows if r["event"] == "train" and r["period"] == PREEMPT_PERIOD]
    assert steps == list(range(1, resumes[0]["total_steps"] + 1)), steps  # each step logged once

    assert comparable(read_results(run)) == comparable(read_results(only_run_dir(ref_root)))
    assert not (REPO / "logs" / f".rank-exits-{job_id}").exists()  # run_job.sh cleans up after itself
