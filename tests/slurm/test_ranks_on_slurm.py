"""One run on two Slurm tasks (two CPU ranks, gloo), through run_job.sh and through launch.py, preempted.

`sbatch --ntasks=2 run_job.sh lora` starts one rank per task with srun; both meet on the first node of
the allocation (MASTER_ADDR/MASTER_PORT from run_job.sh). `scontrol requeue` mid-period sends SIGTERM
to both ranks: they agree to stop at the same step boundary, rank 0 saves a step checkpoint, all exit
75, Slurm requeues the job, and the restarted job resumes. With train.grad_accum equal to the number
of ranks the result is bit for bit that of one uninterrupted process (docs/distributed.md), which runs
once for the module, outside Slurm, while the first job runs.

launch.py --ranks-per-run 2: submitit starts the two tasks; USR2 reaches both, submitit's handler runs
in both but only rank 0's calls checkpoint() and requeues, so the job comes back exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import comparable, log_rows, main_cmd, only_run_dir, read_results, slow_steps

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--set", "train.epochs=2", "--set", "train.threads=1", "--set", "train.progress=false",
        "--set", "train.grad_accum=2", "--set", "checkpoint.every_steps=1"]
SLOW = slow_steps(1.0)  # the jobs' environment: time to hit period 2 mid-training; not part of the run id
PREEMPT_PERIOD = 2


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "synthetic.yaml"  # frozen: the run id hashes the config
    path.write_text((REPO / "configs" / "synthetic.yaml").read_text())
    return path


@pytest.fixture(scope="module")
def reference(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen]:
    """One process, no Slurm, the same config: started at once, read by whichever test needs it first."""
    root = tmp_path_factory.mktemp("reference")
    proc = subprocess.Popen(main_cmd("--method", "lora", "--mode", "synthetic", "--seed", "0", "--config", str(config),
                                     "--run-root", str(root), *ARGS),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"})
    proc.run_root = root  # type: ignore[attr-defined]
    yield proc
    if proc.poll() is None:
        proc.kill()


def reference_results(reference: subprocess.Popen) -> dict:
    if reference.returncode is None:
        out, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, out[-3000:]
    assert reference.returncode == 0
    return comparable(read_results(only_run_dir(reference.run_root)))  # type: ignore[attr-defined]


def train_rows(run_root: Path) -> list[dict]:
    dirs = [d for d in run_root.iterdir() if d.is_dir()] if run_root.is_dir() else []
    return log_rows(dirs[0]) if dirs else []


def wait_for_period(slurm: SlurmCluster, job_id: str, run_root: Path) -> int:
    """Wait until the run trains PREEMPT_PERIOD; the last step logged so far."""
    def progressed() -> bool:
        return any(r.get("event") == "train" and r.get("period") == PREEMPT_PERIOD and r.get("step", 0) >= 1
                   for r in train_rows(run_root))

    slurm.wait_for(f"job {job_id} to train period {PREEMPT_PERIOD}", progressed, timeout_s=300, poll_s=0.2)
    return max(r["step"] for r in train_rows(run_root)
               if r.get("event") == "train" and r.get("period") == PREEMPT_PERIOD)


def check_resumed_once(run_root: Path, stopped_at: int) -> Path:
    """Two ranks, one resume inside the preempted period, every step of it logged once; the run dir."""
    run = only_run_dir(run_root)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    rows = train_rows(run_root)
    resumes = [r for r in rows if r["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["period"] == PREEMPT_PERIOD, resumes
    assert stopped_at <= resumes[0]["from_step"] < resumes[0]["total_steps"], (stopped_at, resumes)
    steps = [r["step"] for r in rows if r["event"] == "train" and r["period"] == PREEMPT_PERIOD]
    assert steps == list(range(1, resumes[0]["total_steps"] + 1)), steps
    return run


def test_two_rank_job_requeued_mid_period_ends_like_one_uninterrupted_process(
        slurm: SlurmCluster, config: Path, reference: subprocess.Popen, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    run_root = tmp_path / "ranks"
    env = {"MODE": "synthetic", "RUN_ROOT": str(run_root), "SEED": "0", "CONFIG": str(config), **SLOW,
           "ENV_CMD": f"env OMP_WAIT_POLICY=PASSIVE PATH={Path(sys.executable).parent}:{os.environ['PATH']}"}
    job_id = slurm.sbatch("--ntasks=2", "--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=20",
                          "--job-name=clkit-ranks", str(REPO / "run_job.sh"), "lora", *ARGS,
                          env=env, cwd=tmp_path)
    log_path = tmp_path / "logs" / f"clkit-ranks-{job_id}.out"
    stopped_at = wait_for_period(slurm, job_id, run_root)
    slurm.run("scontrol", "requeue", job_id)  # SIGTERM to every task of the step, then Slurm requeues
    slurm.release_when_requeued(job_id)
    final = slurm.wait_done(job_id, timeout_s=300)

    log = log_path.read_text() if log_path.exists() else f"(no log at {log_path})"
    assert final["JobState"] == "COMPLETED" and int(final["Restarts"]) >= 1, f"{final}\n{log}"
    assert log.count("run_job.sh: world: 2 ranks on 1 node(s)") == 2, log  # once per attempt
    assert "stopped on SIGTERM" in log, log  # all ranks exited 75; Slurm requeued, run_job.sh did not
    run = check_resumed_once(run_root, stopped_at)
    assert comparable(read_results(run)) == reference_results(reference)
    assert not (REPO / "logs" / f".rank-exits-{job_id}").exists()  # run_job.sh cleans up after itself


def test_launch_two_ranks_usr2_requeues_once_and_ends_like_one_process(
        slurm: SlurmCluster, config: Path, reference: subprocess.Popen, tmp_path: Path) -> None:
    run_root, folder = tmp_path / "runs", tmp_path / "submitit" / "%j"
    argv = ["--methods", "lora", "--seeds", "0", "--mode", "synthetic", "--run-root", str(run_root),
            "--configs", str(config), "--executor", "slurm", "--gpus-per-run", "0", "--ranks-per-run", "2",
            "--cpus", "1", "--mem-gb", "2", "--time-min", "20", "--job-name", "clkit-launch-ranks",
            "--folder", str(folder), "--", *ARGS]
    proc = slurm.run(sys.executable, "scripts/launch.py", *argv, cwd=REPO, env=SLOW)
    record = json.loads(proc.stdout[:proc.stdout.index("\n}\n") + 2])
    job_id, report_id = record["tasks"][0]["job_id"], record["report_job_id"]
    stopped_at = wait_for_period(slurm, job_id, run_root)
    slurm.signal(job_id, "USR2")  # to every process of the step: submitit's handlers and main.py's
    slurm.release_when_requeued(job_id)
    final = slurm.wait_done(job_id, timeout_s=300)
    logs = {t: (tmp_path / "submitit" / job_id / f"{job_id}_{t}_log.out") for t in (0, 1)}
    text = {t: p.read_text() if p.exists() else f"(no log at {p})" for t, p in logs.items()}
    assert final["JobState"] == "COMPLETED" and final["Restarts"] == "1", f"{final}\n{text[0]}\n{text[1]}"
    assert "rank 1 of 2 meeting at" in text[1] and "rank 1 stopped with the others (exit 75)" in text[1], text[1]
    assert "Requeued job" in text[0] and "Requeued job" not in text[1], text  # rank 0 alone requeues
    run = check_resumed_once(run_root, stopped_at)
    assert comparable(read_results(run)) == reference_results(reference)
    assert slurm.wait_done(report_id, timeout_s=120)["JobState"] == "COMPLETED"
