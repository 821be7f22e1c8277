"""run_job.sh and launch.py on a real single-node Slurm cluster, with the real main.py (synthetic mode).

(1) `sbatch run_job.sh casm` completes with a verified manifest for every period.
(2) The same job preempted mid-period, by `scontrol requeue` (SIGTERM path) and by
    `scancel --signal=USR2` (the configured time-limit signal), comes back (Restarts >= 1), resumes from
    its step checkpoint rather than from the start of the period, and ends with the results of (1).
(3) launch.py fans 2 methods x 2 seeds out as one array plus the report job; one task is interrupted
    with USR2 (submitit's protocol); the report runs last and sees all four runs complete.

The three jobs of (1) and (2) run at the same time (the node has 2 CPUs; one each), driven by threads
started in a module fixture, so the module stays within a few minutes.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from artifacts import read_manifest, verify_manifest
from scripts.launch import build, make_parser
from scripts.slurm_render import render_sbatch, train_array_parameters
from tests.conftest import log_rows, slow_steps

if TYPE_CHECKING:
    from conftest import SlurmCluster

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slurm

PERIODS = ["0-base", "1-2018", "2-2020", "3-2022", "4-2024"]
# Small and quick: 2 epochs = 6 optimizer steps per period on the synthetic benchmark; one thread per
# job because the test node has 2 CPUs and runs two jobs at once.
TRAIN_ARGS = ["--set", "train.epochs=2", "--set", "train.threads=1", "--set", "train.progress=false"]
SLOW = slow_steps(1.0)  # the job's environment: time to hit a period mid-training; not part of the run id
# A two-task stream small enough to add seconds, through the same run_job.sh path.
TINY_STREAM = """name: tiny-stream
tasks:
  - name: numbers
    source: {type: generated, domain: math, num_train: 8, num_eval: 4}
    scorer: numeric
    train_split: train
    eval_split: test
  - name: texts
    source: {type: generated, domain: style, num_train: 8, num_eval: 4}
    scorer: perplexity
    train_split: train
    eval_split: test
    loss_on: all
"""
METHOD = "casm"  # the toolkit's own method; its exact resume under Slurm is what users rely on
PREEMPT_PERIOD = 2  # interrupt while training period 2 ("2020"), after at least 2 of its steps


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A frozen copy of the synthetic config: the run id hashes the config, so an edit of
    configs/synthetic.yaml between a job and its requeue would send the restart to a new run directory."""
    path = tmp_path_factory.mktemp("config") / "synthetic.yaml"
    path.write_text((REPO / "configs" / "synthetic.yaml").read_text())
    return path


def sbatch_run_job(slurm: SlurmCluster, submit_dir: Path, run_root: Path, config: Path, *main_args: str,
                   method: str = METHOD, env: dict[str, str] | None = None) -> str:
    """Submitted from a scratch dir, as a user would from anywhere: run_job.sh must find the clone
    itself (scontrol's Command=), and the header's logs/%x-%j.out lands in submit_dir/logs."""
    # --gres=none: the test node has no GPU and the header asks for one; the other overrides fit the node.
    return slurm.sbatch("--gres=none", "--cpus-per-task=1", "--mem=2G", "--time=20", "--job-name=clkit-test",
                        str(REPO / "run_job.sh"), method, *TRAIN_ARGS, *main_args,
                        env={"MODE": "synthetic", "RUN_ROOT": str(run_root), "SEED": "0", "CONFIG": str(config),
                             **(env or {})},
                        cwd=submit_dir)


def only_run_dir(run_root: Path) -> Path:
    dirs = [d for d in run_root.iterdir() if d.is_dir() and not d.name.startswith(".")] if run_root.is_dir() else []
    assert len(dirs) <= 1, dirs
    return dirs[0] if dirs else run_root / "__not_yet__"


def job_log(run_root: Path, job_id: str) -> str:
    path = run_root.parent / "logs" / f"clkit-test-{job_id}.out"
    return path.read_text() if path.exists() else f"(no log at {path})"


@dataclass
class Preempted:
    job_id: str
    run_root: Path
    stopped_at_step: int  # the last train step logged before the signal was sent
    final: dict[str, str]  # scontrol record after the job finished


def preempt_mid_period(slurm: SlurmCluster, job_id: str, run_root: Path, how: str) -> Preempted:
    def progressed() -> bool:
        return any(r.get("event") == "train" and r.get("period") == PREEMPT_PERIOD and r.get("step", 0) >= 2
                   for r in log_rows(only_run_dir(run_root)))

    slurm.wait_for(f"job {job_id} to train period {PREEMPT_PERIOD}", progressed, timeout_s=300, poll_s=0.2)
    logged = [r["step"] for r in log_rows(only_run_dir(run_root))
              if r.get("event") == "train" and r.get("period") == PREEMPT_PERIOD]
    if how == "requeue":
        slurm.run("scontrol", "requeue", job_id)  # Slurm sends SIGTERM, then requeues the job itself
    else:
        slurm.signal(job_id, "USR2")  # run_job.sh requeues after main.py exits 75
    slurm.release_when_requeued(job_id)
    return Preempted(job_id, run_root, max(logged), slurm.wait_done(job_id, timeout_s=300))


@pytest.fixture(scope="module")
def jobs(slurm: SlurmCluster, config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future]]:
    root = tmp_path_factory.mktemp("runjob")
    (root / "logs").mkdir()  # Slurm does not create the --output directory
    ref = sbatch_run_job(slurm, root, root / "reference", config)
    requeue = sbatch_run_job(slurm, root, root / "requeue", config, env=SLOW)
    usr2 = sbatch_run_job(slurm, root, root / "usr2", config, env=SLOW)
    stream_file = root / "tiny-stream.yaml"
    stream_file.write_text(TINY_STREAM)
    stream = sbatch_run_job(slurm, root, root / "stream", config, "--stream", str(stream_file), method="lora")
    with ThreadPoolExecutor(max_workers=4) as pool:
        yield {
            "stream": pool.submit(lambda: (stream, root / "stream", slurm.wait_done(stream, timeout_s=400))),
            "reference": pool.submit(lambda: (ref, root / "reference", slurm.wait_done(ref, timeout_s=400))),
            "requeue": pool.submit(preempt_mid_period, slurm, requeue, root / "requeue", "requeue"),
            "usr2": pool.submit(preempt_mid_period, slurm, usr2, root / "usr2", "usr2"),
        }


def test_sbatch_run_job_completes_with_a_manifest_for_every_period(jobs: dict[str, Future]) -> None:
    job_id, run_root, final = jobs["reference"].result(timeout=420)
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", job_log(run_root, job_id)
    assert f"run_job.sh: in {REPO}:" in job_log(run_root, job_id)  # found the clone from a foreign submit dir
    run = only_run_dir(run_root)
    for name in PERIODS:
        ok, reason = verify_manifest(run / "periods" / name)
        assert ok, f"{name}: {reason}"
        manifest = read_manifest(run / "periods" / name)
        assert manifest["status"] == "complete" and manifest["slurm_job_id"] == job_id
        assert manifest["restart_count"] == 0
    assert (run / "results.json").exists()
    assert final["Restarts"] == "0"


def test_sbatch_run_job_runs_a_task_stream_to_the_end(jobs: dict[str, Future]) -> None:
    job_id, run_root, final = jobs["stream"].result(timeout=420)
    assert final["JobState"] == "COMPLETED" and final["ExitCode"] == "0:0", job_log(run_root, job_id)
    run = only_run_dir(run_root)
    assert run.name.startswith("tiny-stream-lora-s0-")
    for name in ("0-base", "1-numbers", "2-texts"):
        ok, reason = verify_manifest(run / "periods" / name)
        assert ok, f"{name}: {reason}"
        assert read_manifest(run / "periods" / name)["slurm_job_id"] == job_id
    results = json.loads((run / "results.json").read_text())
    assert results["kind"] == "stream" and results["periods"] == ["numbers", "texts"]


@pytest.mark.parametrize("how", ["requeue", "usr2"])
def test_preempted_job_resumes_from_its_step_checkpoint_with_identical_results(jobs: dict[str, Future],
                                                                               how: str) -> None:
    p: Preempted = jobs[how].result(timeout=420)
    log = job_log(p.run_root, p.job_id)
    record = {k: p.final.get(k) for k in ("JobState", "Reason", "ExitCode", "Restarts", "RunTime", "BatchHost")}
    assert p.final["JobState"] == "COMPLETED", f"{record}\n{log}"
    assert int(p.final["Restarts"]) >= 1, log
    run = only_run_dir(p.run_root)
    rows = log_rows(run)

    # Resumed from a step checkpoint inside period 2, at or after the last step seen before the signal.
    resumes = [r for r in rows if r["event"] == "resume"]
    assert len(resumes) == 1, resumes
    assert resumes[0]["period"] == PREEMPT_PERIOD and resumes[0]["restart_count"] == 1
    total_steps = resumes[0]["total_steps"]
    assert p.stopped_at_step <= resumes[0]["from_step"] < total_steps, (p.stopped_at_step, resumes)

    # SLURM_RESTART_COUNT reached the manifests of the periods committed after the restart.
    restarts = {name: read_manifest(run / "periods" / name)["restart_count"] for name in PERIODS}
    assert restarts == {"0-base": 0, "1-2018": 0, "2-2020": 1, "3-2022": 1, "4-2024": 1}, restarts
    if how == "usr2":
        assert "checkpoint saved; requeued" in log, log  # run_job.sh requeued itself
    else:
        assert "stopped on SIGTERM" in log, log  # Slurm requeued it; run_job.sh did not requeue again

    # Same numbers as the uninterrupted run: final trainable state and every score matrix.
    _, ref_root, _ = jobs["reference"].result(timeout=420)
    ref = json.loads((only_run_dir(ref_root) / "results.json").read_text())
    got = json.loads((run / "results.json").read_text())
    assert got["final_state_sha256"] == ref["final_state_sha256"]
    matrices = [k for k in ref["metrics"] if k.startswith("matrix")]
    assert matrices, sorted(ref["metrics"])
    for key in matrices:
        assert got["metrics"][key] == ref["metrics"][key], key

    # train_log.jsonl holds every step of the interrupted period exactly once: the steps before the
    # checkpoint kept, the ones after it not duplicated.
    steps = [r["step"] for r in rows if r["event"] == "train" and r["period"] == PREEMPT_PERIOD]
    assert steps == list(range(1, total_steps + 1)), steps


def test_launch_fans_out_an_array_and_the_report_runs_last_and_sees_all_runs(slurm: SlurmCluster, config: Path,
                                                                             tmp_path: Path) -> None:
    run_root, folder = tmp_path / "runs", tmp_path / "submitit" / "%j"
    argv = ["--methods", "lora,full_ft", "--seeds", "0,1", "--mode", "synthetic", "--run-root", str(run_root),
            "--configs", str(config),
            "--executor", "slurm", "--gpus", "0", "--cpus", "1", "--mem-gb", "2", "--time-min", "20",
            "--parallelism", "2", "--job-name", "clkit-launch", "--folder", str(folder),
            "--", "--set", "train.epochs=1", "--set", "train.threads=1", "--set", "train.progress=false"]
    proc = slurm.run("uv", "run", "--frozen", "python", "scripts/launch.py", *argv, cwd=REPO, env=slow_steps(0.5))
    record = json.loads(proc.stdout[:proc.stdout.index("\n}\n") + 2])
    array_id, report_id = record["array_job_id"], record["report_job_id"]
    assert [t["job_id"] for t in record["tasks"]] == [f"{array_id}_{i}" for i in range(4)]
    run_ids = [t["run_id"] for t in record["tasks"]]
    assert len(set(run_ids)) == 4

    # One array, throttled to 2, and the report waits on all of it.
    array = slurm.jobs(array_id)
    assert {j["ArrayJobId"] for j in array} == {array_id} and array[0]["ArrayTaskThrottle"] == "2", array
    report = slurm.job(report_id)
    assert report["Dependency"].startswith(f"afterany:{array_id}"), report
    # What was submitted is exactly what --dry-run renders.
    submitted = (tmp_path / "submitit" / array_id / f"{array_id}_submission.sh").read_text()
    _, res = build(make_parser().parse_args(argv[:argv.index("--")]), [])
    assert submitted == render_sbatch(train_array_parameters(res), python=shlex.quote(sys.executable),
                                      folder=str(folder), map_count=4)

    # USR2 to task 0 once its main.py is training: submitit's handler -> TrainTask.checkpoint -> requeue.
    first_run = run_root / run_ids[0]
    slurm.wait_for("task 0 to train", lambda: any(r.get("event") == "train" for r in log_rows(first_run)),
                   timeout_s=300, poll_s=0.2)
    slurm.signal(f"{array_id}_0", "USR2")
    slurm.release_when_requeued(f"{array_id}_0")

    final_report = slurm.wait_done(report_id, timeout_s=420)
    tasks = slurm.jobs(array_id)
    assert final_report["JobState"] == "COMPLETED"
    assert all(t["JobState"] == "COMPLETED" for t in tasks), tasks
    assert max(int(t["Restarts"]) for t in tasks) >= 1
    assert final_report["StartTime"] >= max(t["EndTime"] for t in tasks)  # ISO timestamps sort as text
    report_log = next((tmp_path / "submitit").glob(f"{report_id}/{report_id}_0_log.out")).read_text()
    assert "report: all 4 runs complete" in report_log, report_log
    for run_id in run_ids:
        assert re.search(rf"^{re.escape(run_id)}\s+complete\s+4/4\s", report_log, flags=re.M), report_log
    assert [r for r in log_rows(first_run) if r["event"] == "resume"], "task 0 did not resume"
