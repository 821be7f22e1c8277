"""One run across two Slurm nodes (n1 at 127.0.0.2, n2 at 127.0.0.3: names that are not host names), for real.

Measured before (issue 24): the ranks met at `n1`, a name from the host list that does not resolve, and
retried in silence until cancelled. Now they meet at n1's NodeAddr, as Slurm knows it.

Two jobs run side by side on the two-node cluster, one CPU of each node each, so the module costs one
job's time (about two minutes on two shared cores):

(A) `sbatch --nodes=2 --ntasks-per-node=1 run_job.sh lora`: n2 dies mid-run (its slurmd, its step
    daemons and the rank on it SIGKILLed). The rank on n1 ends in the documented line ("lost contact
    with another rank", exit 75); Slurm declares n2 DOWN, cancels the job on n1 "due to node failure" and
    requeues it (`--requeue`); once n2 is back, the job resumes from its newest step checkpoint.
(B) `launch.py --nodes 2 --ranks-per-run 2`: `scontrol requeue` mid-period (SIGTERM to both ranks: they
    agree to stop, rank 0 saves, both exit 75, Slurm requeues); it is held until n2 is back (a dead node
    ends every job on it, and this one must see a requeue only) and then resumes.

The sbatch job is held until the launch job runs, and frozen (`scontrol suspend`) if it reaches the
period before the launch job has left the nodes. Both end bit for bit like one uninterrupted process
(train.grad_accum = the number of ranks), which runs outside Slurm while n2 is down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
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
SLOW = slow_steps(1.0)  # the jobs' environment: time to act mid-period; not part of the run id
STOP_PERIOD = 2  # both jobs are interrupted once they train this period (A may be a period further by then)
RENDEZVOUS = "127.0.0.2"  # n1's NodeAddr in scripts/local_slurm.sh's two-node cluster


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "synthetic.yaml"  # frozen: the run id hashes the config
    path.write_text((REPO / "configs" / "synthetic.yaml").read_text())
    return path


def run_dir(run_root: Path) -> Path | None:
    """The run's directory: beside it launch.py's runs have tracking/ and the report job's report/."""
    dirs = [d for d in run_root.iterdir() if (d / "train_log.jsonl").exists()] if run_root.is_dir() else []
    assert len(dirs) <= 1, dirs
    return dirs[0] if dirs else None


def train_rows(run_root: Path) -> list[dict]:
    run = run_dir(run_root)
    return log_rows(run) if run else []


def training(run_root: Path, period: int, step: int = 1) -> Callable[[], bool]:
    """True once the run has logged step `step` of `period`, or any step of a later period."""
    return lambda: any(r.get("event") == "train" and (r.get("period", 0), r.get("step", 0)) >= (period, step)
                       for r in train_rows(run_root))


@dataclass
class Outcome:
    job_id: str
    run_root: Path
    final: dict[str, str]
    log: str


@pytest.fixture(scope="module")
def outcomes(slurm_two_nodes: SlurmCluster, config: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    slurm = slurm_two_nodes
    root = tmp_path_factory.mktemp("two-nodes")
    (root / "logs").mkdir()
    launch_root, sbatch_root = root / "launch", root / "sbatch"
    argv = ["--methods", "lora", "--seeds", "0", "--mode", "synthetic", "--run-root", str(launch_root),
            "--configs", str(config), "--executor", "slurm", "--gpus-per-run", "0", "--nodes", "2",
            "--ranks-per-run", "2", "--cpus", "1", "--mem-gb", "2", "--time-min", "20",
            "--job-name", "clkit-launch-nodes", "--folder", str(root / "submitit" / "%j"), "--", *ARGS]
    # launch.py resolves the run id with main.py's config code first (heavy imports): in the background, with
    # the time a loaded 2-core machine needs
    launcher = subprocess.Popen([sys.executable, "scripts/launch.py", *argv], cwd=REPO, env={**slurm.env, **SLOW},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    env = {"MODE": "synthetic", "RUN_ROOT": str(sbatch_root), "SEED": "0", "CONFIG": str(config), **SLOW,
           "ENV_CMD": f"env OMP_WAIT_POLICY=PASSIVE PATH={Path(sys.executable).parent}:{os.environ['PATH']}"}
    # held until the launch job runs too, so that the two progress side by side
    sbatch_job = slurm.sbatch("--hold", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gres=none",
                              "--mem=2G", "--time=20", "--job-name=clkit-nodes", str(REPO / "run_job.sh"), "lora",
                              *ARGS, env=env, cwd=root)
    try:
        out, err = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, f"launch.py exited {launcher.returncode}:\n{out}\n{err}"
    launch_job = json.loads(out[:out.index("\n}\n") + 2])["tasks"][0]["job_id"]
    state = lambda job: slurm.job(job).get("JobState")  # noqa: E731
    n2_back = threading.Event()
    reference: list[subprocess.Popen] = []

    def launch_requeued_mid_period() -> Outcome:
        slurm.wait_for(f"launch job {launch_job} to train period {STOP_PERIOD}", training(launch_root, STOP_PERIOD),
                       timeout_s=300, poll_s=0.2)
        slurm.run("scontrol", "requeue", launch_job)  # SIGTERM to both ranks; Slurm requeues the job
        slurm.wait_for(f"job {launch_job} requeued", lambda: state(launch_job) == "PENDING", timeout_s=120,
                       poll_s=0.5)
        n2_back.wait(timeout=400)  # held (BeginTime) while n2 is dead: a dead node ends every job on it
        slurm.release_when_requeued(launch_job)
        final = slurm.wait_done(launch_job, timeout_s=300)
        logs = [root / "submitit" / launch_job / f"{launch_job}_{t}_log.out" for t in (0, 1)]
        return Outcome(launch_job, launch_root, final, "\n".join(p.read_text() for p in logs if p.exists()))

    def sbatch_loses_a_node() -> Outcome:
        try:
            slurm.wait_for(f"launch job {launch_job} to start", lambda: state(launch_job) != "PENDING",
                           timeout_s=120, poll_s=0.5)
            slurm.run("scontrol", "release", sbatch_job)
            # step 2: its row is logged after step 1's checkpoint was committed. A node lost at step 1 would
            # resume from the start of the period (the checkpoint needs both ranks), which is right, but
            # then no step checkpoint is tested
            slurm.wait_for(f"job {sbatch_job} to train period {STOP_PERIOD}",
                           training(sbatch_root, STOP_PERIOD, step=2), timeout_s=300, poll_s=0.2)
            if state(launch_job) != "PENDING":
                # n2 may die only once the launch job has left the nodes (its requeue above), so that the death
                # ends this job alone; until then this one is frozen (SIGSTOP), or it could finish first
                slurm.run("scontrol", "suspend", sbatch_job)
                slurm.wait_for(f"job {launch_job} off the nodes", lambda: state(launch_job) == "PENDING",
                               timeout_s=180, poll_s=0.5)
                slurm.run("scontrol", "resume", sbatch_job)
            assert state(sbatch_job) == "RUNNING", "the job ended before n2 could die"
            slurm.kill_node("n2")
            # the one-process reference meanwhile: the nodes are idle until Slurm has noticed
            reference.append(subprocess.Popen(
                main_cmd("--method", "lora", "--mode", "synthetic", "--seed", "0", "--config", str(config),
                         "--run-root", str(root / "reference"), *ARGS),
                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}))
            # SlurmdTimeout (6 s here) later slurmctld sets n2 DOWN and requeues the job (--requeue)
            slurm.wait_for(f"job {sbatch_job} requeued after n2 died",
                           lambda: (lambda j: j.get("JobState") == "PENDING" and int(j.get("Restarts", "0")) >= 1)(
                               slurm.job(sbatch_job)), timeout_s=120, poll_s=0.5)
            slurm.start_node("n2")
        finally:
            n2_back.set()
        slurm.release_when_requeued(sbatch_job)
        final = slurm.wait_done(sbatch_job, timeout_s=300)
        log = root / "logs" / f"clkit-nodes-{sbatch_job}.out"
        return Outcome(sbatch_job, sbatch_root, final, log.read_text() if log.exists() else f"(no log at {log})")

    def reference_results(sbatch: Future) -> dict:
        sbatch.exception()  # the reference starts once n2 has died
        assert reference, "the reference run never started"
        out, _ = reference[0].communicate(timeout=600)
        assert reference[0].returncode == 0, out[-3000:]
        return comparable(read_results(only_run_dir(root / "reference")))

    pool = ThreadPoolExecutor(max_workers=3)
    try:
        sbatch = pool.submit(sbatch_loses_a_node)
        yield {"sbatch": sbatch, "launch": pool.submit(launch_requeued_mid_period),
               "reference": pool.submit(reference_results, sbatch)}
    finally:
        n2_back.set()
        pool.shutdown(wait=True)
        for proc in reference:
            if proc.poll() is None:
                proc.kill()


def check_resumed_once(outcome: Outcome) -> dict:
    """Two ranks, one resume at or after STOP_PERIOD, every step of the resumed period logged once."""
    run = run_dir(outcome.run_root)
    assert run is not None, f"no run under {outcome.run_root}"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    rows = log_rows(run)
    resumes = [r for r in rows if r["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["period"] >= STOP_PERIOD, resumes
    steps = [r["step"] for r in rows if r["event"] == "train" and r["period"] == resumes[0]["period"]]
    assert steps == list(range(1, resumes[0]["total_steps"] + 1)), steps
    return comparable(read_results(run))


def test_a_node_dying_mid_run_ends_in_the_documented_exit_and_a_requeue_that_resumes(
        outcomes: dict[str, Future]) -> None:
    got: Outcome = outcomes["sbatch"].result(timeout=900)
    record = {k: got.final.get(k) for k in ("JobState", "ExitCode", "Restarts", "NodeList", "NumNodes")}
    assert got.final["JobState"] == "COMPLETED" and got.final["Restarts"] == "1", f"{record}\n{got.log}"
    assert got.final["NodeList"] == "n[1-2]", record
    # each attempt met at n1's NodeAddr, not at the name n1 (which does not resolve)
    assert got.log.count(f"world: 2 ranks on 2 node(s) (n[1-2]), rendezvous {RENDEZVOUS}:") == 2, got.log
    # the documented exit: the rank that survived says it lost its peer and exits 75; Slurm cancels the job
    # because of the node failure and requeues it (run_job.sh does not requeue a second time)
    assert "error: rank 0 lost contact with another rank of the run" in got.log, got.log
    assert "DUE TO NODE FAILURE" in got.log and "stopped on SIGTERM" in got.log, got.log
    assert "checkpoint saved; requeued" not in got.log, got.log
    assert check_resumed_once(got) == outcomes["reference"].result(timeout=900)


def test_launch_on_two_nodes_survives_scontrol_requeue_with_identical_results(outcomes: dict[str, Future]) -> None:
    got: Outcome = outcomes["launch"].result(timeout=900)
    assert got.final["JobState"] == "COMPLETED" and got.final["Restarts"] == "1", f"{got.final}\n{got.log}"
    assert got.final["NodeList"] == "n[1-2]", got.final
    assert f"rank 1 of 2 meeting at {RENDEZVOUS}:" in got.log, got.log
    assert check_resumed_once(got) == outcomes["reference"].result(timeout=900)
