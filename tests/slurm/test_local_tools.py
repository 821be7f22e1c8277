"""run_job.sh outside Slurm, scripts/status.py, and launch.py's tasks on submitit's local/debug executors.

No Slurm needed and fast: main.py is replaced by tests/slurm/standin_main.py, which keeps main.py's
process contract (exit codes, signals, run directory layout) and trains nothing. The same paths with
the real main.py on a real cluster are in test_real_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit

from scripts import status
from scripts.launch import ReportTask, TrainTask

REPO = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "standin_main.py"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A checkout whose main.py is the stand-in, with run_job.sh next to it."""
    d = tmp_path / "repo"
    d.mkdir()
    (d / "main.py").symlink_to(STANDIN)
    (d / "run_job.sh").symlink_to(REPO / "run_job.sh")
    return d


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # The stand-in needs only the venv's python; ENV_CMD is the documented hook for "how to get python".
    env.update(MODE="synthetic", RUN_ROOT=str(tmp_path / "runs"),
               ENV_CMD=f"env PATH={Path(sys.executable).parent}:{os.environ['PATH']}", **extra)
    return env


def run_job(repo: Path, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(repo / "run_job.sh"), *args], env=job_env(tmp_path, **env), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_run_job_runs_locally_and_passes_arguments(repo: Path, tmp_path: Path) -> None:
    proc = run_job(repo, tmp_path, "lora", "--set", "train.steps=2", SEED="3")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "standin-lora-s3"
    assert (run / "results.json").exists()
    assert "--method lora --mode synthetic --seed 3" in proc.stderr
    st = status.run_status(run)
    assert (st.state, st.periods_done, st.periods_total, st.restarts) == ("complete", 4, 4, 0)


def test_run_job_stops_on_usr2_with_75_and_the_rerun_resumes(repo: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen(["bash", str(repo / "run_job.sh"), "lora", "--set", "train.step_sleep=0.2",
                             "--set", "train.steps=10"], env=job_env(tmp_path), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "standin-lora-s0"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(
            r.get("period") == 2 for r in (read_log(run) if (run / "train_log.jsonl").exists() else [])):
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR2)  # to bash: its trap forwards it to python
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    assert "run the same command again to resume" in err
    st = status.run_status(run)
    assert st.state == "partial" and st.last_checkpoint is not None and st.last_checkpoint.startswith("2-2020 step ")
    stopped_at = int(st.last_checkpoint.rsplit(" ", 1)[1])
    again = run_job(repo, tmp_path, "lora", "--set", "train.step_sleep=0", "--set", "train.steps=10")
    assert again.returncode == 0, again.stderr
    resumes = [r for r in read_log(run) if r["event"] == "resume"]
    assert resumes == [{"event": "resume", "period": 2, "from_step": stopped_at, "restart_count": 0,
                        "slurm_job_id": None}]
    assert status.run_status(run).state == "complete"


def test_run_job_bad_input_is_not_retried_and_says_why(repo: Path, tmp_path: Path) -> None:
    proc = run_job(repo, tmp_path, "badmethod")
    assert proc.returncode == 2
    assert "unknown method 'badmethod'" in proc.stderr and "main.py failed with exit code 2" in proc.stderr


def test_run_job_explains_missing_pieces(repo: Path, tmp_path: Path) -> None:
    no_method = run_job(repo, tmp_path)
    assert no_method.returncode == 2 and "usage: [sbatch] run_job.sh METHOD" in no_method.stderr
    no_uv = subprocess.run(["bash", str(repo / "run_job.sh"), "lora"], cwd=tmp_path, capture_output=True, text=True,
                           env={**job_env(tmp_path), "ENV_CMD": "", "PATH": "/usr/bin:/bin"})
    # ENV_CMD="" means the default (uv), which this PATH lacks.
    assert no_uv.returncode == 2 and "'uv' is not on PATH" in no_uv.stderr
    no_repo = run_job(repo, tmp_path, "lora", REPO_DIR=str(tmp_path / "nowhere"))
    assert no_repo.returncode == 2 and "has no main.py" in no_repo.stderr


def test_status_reports_progress_restarts_and_the_last_error(repo: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    # A failed attempt of "job 41", as Slurm would have logged it.
    failed = run_job(repo, tmp_path, "lora", "--set", "train.fail_at=3:2", SLURM_RESTART_COUNT="2")
    assert failed.returncode == 1
    (logs / "clkit-41.out").write_text(failed.stderr)
    run = tmp_path / "runs" / "standin-lora-s0"
    run_json = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**run_json, "slurm_job_id": "41"}))
    (tmp_path / "runs" / "not-a-run").mkdir()  # ignored: no config.yaml, periods/ or run.json
    # A corrupt committed period is not counted, and the reason is shown.
    (run / "periods" / "2-2020" / "scores.json").write_text("tampered")

    (st,) = status.scan(tmp_path / "runs", [logs])
    assert (st.state, st.periods_done, st.periods_total, st.restarts, st.job) == ("partial", 1, 4, 2, "41")
    assert st.last_error == "RuntimeError: injected failure at period 3 step 2"
    assert st.invalid and st.invalid[0].startswith("2-2020: ")

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "status.py"), str(tmp_path / "runs"), "--logs",
                          str(logs), "--expect", "standin-lora-s0", "--expect", "standin-casm-s0",
                          "--fail-incomplete"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["RUN", "STATE", "PERIODS", "CHECKPOINT", "RESTARTS", "JOB", "LAST", "ERROR"]
    assert lines[1].split()[:6] == ["standin-lora-s0", "partial", "1/4", "-", "2", "41"]
    assert lines[2].split()[:2] == ["standin-casm-s0", "missing"]


def test_train_task_requeues_through_submitits_usr2_protocol_on_the_local_executor(repo: Path,
                                                                                   tmp_path: Path) -> None:
    """LocalExecutor: its controller sends USR2 signal_delay_s before timeout_min -> TrainTask.checkpoint
    -> main.py saves a step checkpoint, exits 75 -> submitit restarts the task (exit 144 = requeue) from
    the pickled fresh task -> main.py resumes from that step checkpoint and finishes."""
    run_root = tmp_path / "runs"
    ex = submitit.LocalExecutor(folder=tmp_path / "submitit" / "%j")
    # USR2 5 s into every attempt; the run needs ~7 s of steps, so exactly one requeue.
    ex.update_parameters(timeout_min=0.25, signal_delay_s=10, stderr_to_stdout=True)
    task = TrainTask(["--method", "lora", "--seed", "0", "--run-root", str(run_root), "--set", "train.steps=8",
                      "--set", "train.step_sleep=0.2"], str(repo), sys.executable, stop_timeout_s=5)
    job = ex.submit(task)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not job.done():
        time.sleep(0.2)
    log = Path(job.paths.stdout).read_text()
    assert job.result() == {"argv": task.argv, "returncode": 0}, log
    run = run_root / "standin-lora-s0"
    resumes = [r for r in read_log(run) if r["event"] == "resume"]
    assert len(resumes) == 1 and resumes[0]["from_step"] >= 1, log
    assert "Requeued job" in log and log.count("launch.py task: ") == 2
    assert status.run_status(run).state == "complete"


def test_report_task_lists_missing_and_partial_runs(repo: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_root = tmp_path / "runs"
    assert run_job(repo, tmp_path, "lora", "--set", "train.steps=1").returncode == 0
    assert run_job(repo, tmp_path, "casm", "--set", "train.fail_at=2:1").returncode == 1
    # Called directly: the DebugExecutor would open pdb on the expected failure.
    assert ReportTask(str(run_root), ["standin-lora-s0"], str(REPO), sys.executable, [])()["complete"] == [
        "standin-lora-s0"]
    bad = ReportTask(str(run_root), ["standin-lora-s0", "standin-casm-s0", "standin-smf-s0"], str(REPO),
                     sys.executable, [])
    with pytest.raises(RuntimeError, match="1 partial and 1 missing runs"):
        bad()
    out = capsys.readouterr().out
    assert "report: partial: standin-casm-s0" in out and "report: missing: standin-smf-s0" in out


@pytest.mark.slow
def test_launch_dry_run_prints_tasks_and_scripts_and_rejects_bad_config_before_queueing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scripts.launch import main as launch_main

    common = ["--methods", "lora,full_ft", "--seeds", "0-1", "--mode", "synthetic", "--run-root", str(tmp_path / "r"),
              "--gpus", "0", "--parallelism", "3", "--folder", str(tmp_path / "sub" / "%j"), "--dry-run"]
    assert launch_main(common + ["--", "--set", "train.epochs=1"]) == 0
    out = capsys.readouterr().out
    tasks = [line for line in out.splitlines() if line.startswith("# task ")]
    assert len(tasks) == 4
    assert "main.py --method full_ft --seed 1 --mode synthetic" in tasks[3]
    assert re.search(r"->  temporalwiki-full_ft-s1-[0-9a-f]{8}$", tasks[3]), tasks[3]
    assert "#SBATCH --array=0-3%3" in out and "#SBATCH --dependency='afterany:<ARRAY_JOB_ID>'" in out
    assert not (tmp_path / "sub").exists() and not (tmp_path / "r").exists()  # nothing submitted or written

    assert launch_main(common + ["--", "--set", "train.epochs=0"]) == 2
    assert "train.epochs must be in [1, 1000] (got 0)" in capsys.readouterr().err


def test_job_logs_are_matched_by_whole_job_id(tmp_path: Path) -> None:
    for name in ["clkit-4.out", "clkit-14_4.out", "14_4/14_4_0_log.out", "4/4_0_log.out", "4/4_submitted.pkl",
                 "x-44.out", "clkit-4.err"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    found = lambda job: sorted(p.relative_to(tmp_path).as_posix() for p in status.find_job_logs([tmp_path], [job]))  # noqa: E731
    assert found("4") == ["4/4_0_log.out", "clkit-4.err", "clkit-4.out"]
    assert found("14_4") == ["14_4/14_4_0_log.out", "clkit-14_4.out"]
