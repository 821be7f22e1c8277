"""run_job.sh's own decisions on a real Slurm cluster, with the stand-in main.py (instant start).

Which exit codes requeue and which do not, and the array-aware requeue id (<array>_<task>), are
properties of the wrapper, not of training; the stand-in keeps main.py's process contract
(tests/slurm/standin_main.py) and starts in a fraction of a second instead of ~20 s.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "standin_main.py"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout with the stand-in as main.py; run_job.sh is submitted from here, so logs/ is here too."""
    d = tmp_path / "repo"
    (d / "logs").mkdir(parents=True)
    (d / "main.py").symlink_to(STANDIN)
    (d / "run_job.sh").symlink_to(REPO / "run_job.sh")
    (d / "training").symlink_to(REPO / "training")  # run_job.sh finds the ranks' rendezvous host with it
    return d


def submit(slurm: SlurmCluster, checkout: Path, *args: str, sbatch_args: tuple[str, ...] = ()) -> str:
    env = {"MODE": "synthetic", "RUN_ROOT": str(checkout / "runs"),
           "ENV_CMD": f"env PATH={Path(sys.executable).parent}:{os.environ['PATH']}"}
    # --time well above run_job.sh's --signal=USR2@300: with --time=5 the warning signal was due from
    # the start, and slurmctld's periodic check sent a second USR2 (and a second requeue) at random.
    return slurm.sbatch("--gres=none", "--cpus-per-task=1", "--mem=1G", "--time=20", "--job-name=wrap",
                        *sbatch_args, str(checkout / "run_job.sh"), *args, env=env, cwd=checkout)


def test_failures_are_not_requeued(slurm: SlurmCluster, checkout: Path) -> None:
    bad_input = submit(slurm, checkout, "badmethod")
    crash = submit(slurm, checkout, "lora", "--set", "train.fail_at=2:1")
    for job_id, code in ((bad_input, "2:0"), (crash, "1:0")):
        final = slurm.wait_done(job_id, timeout_s=60)
        log = (checkout / "logs" / f"wrap-{job_id}.out").read_text()
        assert (final["JobState"], final["ExitCode"], final["Restarts"]) == ("FAILED", code, "0"), log
        assert "not requeued" in log


def test_array_task_requeues_itself_by_its_array_id_and_resumes(slurm: SlurmCluster, checkout: Path) -> None:
    array = submit(slurm, checkout, "lora", "--set", "train.steps=20", "--set", "train.step_sleep=0.25",
                   sbatch_args=("--array=0-1", "--output=logs/%x-%A_%a.out"))
    run = checkout / "runs" / "standin-lora-s1"  # SEED defaults to the array task id

    def training() -> bool:
        log = run / "train_log.jsonl"
        return log.exists() and any(json.loads(line).get("period") == 1 for line in log.read_text().splitlines())

    slurm.wait_for("task 1 to train", training, timeout_s=60, poll_s=0.1)
    # Not in the first second of the job: Slurm refuses to signal a job that is still launching.
    slurm.wait_for("task 1 to run 2 s", lambda: slurm.job(f"{array}_1").get("RunTime", "0") >= "00:00:02",
                   timeout_s=30, poll_s=0.2)
    slurm.signal(f"{array}_1", "USR2")
    slurm.release_when_requeued(f"{array}_1", timeout_s=60)
    final = slurm.wait_done(array, timeout_s=120)
    tasks = {j["ArrayTaskId"]: j for j in slurm.jobs(array)}
    assert final and {t["JobState"] for t in tasks.values()} == {"COMPLETED"}, tasks
    assert (tasks["0"]["Restarts"], tasks["1"]["Restarts"]) == ("0", "1")
    log = (checkout / "logs" / f"wrap-{array}_1.out").read_text()
    assert f"requeued {array}_1 (restart 1)" in log, log
    resume = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()
              if '"resume"' in line]
    assert len(resume) == 1 and resume[0]["slurm_job_id"] == f"{array}_1" and resume[0]["restart_count"] == 1
    assert (checkout / "runs" / "standin-lora-s0" / "results.json").exists()


# Two ranks whose "python" is a script: which per-rank exit codes requeue. Measured on 22.05: srun alone
# returns the highest code, so a crash (1) next to a peer's "lost contact" (75) would read as 75.
CRASH = """#!/bin/bash
if [[ $SLURM_PROCID == 1 ]]; then sleep 1; echo "rank 1 crashes"; exit 1; fi
sleep 3; echo "rank 0 lost contact with another rank"; exit 75
"""
STOP_ONCE = """#!/bin/bash
if [[ ${SLURM_RESTART_COUNT:-0} == 0 ]]; then sleep $((1 + SLURM_PROCID)); exit 75; fi
echo "rank $SLURM_PROCID finished"; exit 0
"""


@pytest.mark.parametrize("ranks, state, code, restarts", [(CRASH, "FAILED", "1:0", "0"),
                                                          (STOP_ONCE, "COMPLETED", "0:0", "1")])
def test_two_ranks_requeue_only_when_every_rank_stopped(slurm: SlurmCluster, checkout: Path, ranks: str,
                                                        state: str, code: str, restarts: str) -> None:
    fake = checkout / "ranks.sh"
    fake.write_text(ranks)
    fake.chmod(0o755)
    job = slurm.sbatch("--ntasks=2", "--gres=none", "--cpus-per-task=1", "--mem=1G", "--time=20", "--job-name=wrap",
                       str(checkout / "run_job.sh"), "lora",
                       env={"MODE": "synthetic", "RUN_ROOT": str(checkout / "runs"), "ENV_CMD": str(fake)},
                       cwd=checkout)
    if restarts == "1":
        slurm.release_when_requeued(job, timeout_s=60)
    final = slurm.wait_done(job, timeout_s=60)
    log = (checkout / "logs" / f"wrap-{job}.out").read_text()
    assert (final["JobState"], final["ExitCode"], final["Restarts"]) == (state, code, restarts), log
    assert "world: 2 ranks on 1 node(s)" in log
    if ranks == CRASH:
        assert "rank 1 exited with code 1" in log and "not requeued" in log, log
    else:
        assert f"requeued {job} (restart 1)" in log and log.count("finished") == 2, log
    assert not list((checkout / "logs").glob(".rank-exits-*"))  # run_job.sh cleans up after itself
