"""The sbatch text launch.py submits, pinned by golden files (tests/slurm/golden/).

The text is submitit's own rendering of our parameters, so this also catches a submitit upgrade that
changes the job script. After an intended change: UPDATE_GOLDEN=1 uv run pytest tests/test_slurm_render.py
and review the diff of the golden files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.command import BadInput

from scripts.launch import make_parser, parse_seeds
from scripts.slurm_render import (SlurmResources, expand_tasks, render_sbatch, report_parameters,
                                  train_array_parameters)
from tests.conftest import REPO

GOLDEN = Path(__file__).parent / "slurm" / "golden"
PYTHON = "/repo/.venv/bin/python"
FOLDER = "/repo/logs/submitit/%j"
RES = SlurmResources(job_name="clkit", time_min=720, cpus_per_task=8, mem_gb=64, gpus_per_node=1,
                     partition="gpu", account=None, qos=None, signal_delay_s=300, array_parallelism=2,
                     extra=(("constraint", "a100"),), setup=("module load cuda/12.1",), pythonpath="/repo",
                     python=PYTHON)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), f"{name} differs from the golden file (UPDATE_GOLDEN=1 to accept)"


def test_train_array_script_matches_golden() -> None:
    text = render_sbatch(train_array_parameters(RES), python=PYTHON, folder=FOLDER, map_count=4)
    check_golden("train_array.sbatch", text)


def test_report_script_matches_golden() -> None:
    text = render_sbatch(report_parameters(RES, "1234"), python=PYTHON, folder=FOLDER)
    check_golden("report.sbatch", text)


def sbatch_flags(text: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(.*))?$", text, flags=re.M))


def test_train_array_has_what_preemption_needs() -> None:
    flags = sbatch_flags(render_sbatch(train_array_parameters(RES), python=PYTHON, folder=FOLDER, map_count=4))
    assert flags["array"] == "0-3%2"  # one array, throttled
    assert flags["signal"] == "USR2@300"  # submitit's protocol signal, early enough to checkpoint
    assert "requeue" in flags and flags["open-mode"] == "append"
    assert flags["gpus-per-node"] == "1" and flags["cpus-per-task"] == "8" and flags["mem"] == "64GB"
    assert flags["constraint"] == "a100" and flags["partition"] == "gpu"


def test_report_runs_after_any_outcome_and_never_waits_on_a_bad_dependency() -> None:
    text = render_sbatch(report_parameters(RES, "1234"), python=PYTHON, folder=FOLDER)
    flags = sbatch_flags(text)
    assert flags["dependency"] == "afterany:1234"  # not afterok: a failed member must not block it
    assert flags["kill-on-invalid-dep"] == "yes"
    assert "gpus-per-node" not in flags and "constraint" not in flags and "array" not in flags


def test_cpu_only_cluster_asks_for_no_gpu() -> None:
    params = train_array_parameters(RES.with_updates(gpus_per_node=0))
    assert "gpus_per_node" not in params
    assert "gpus-per-node" not in sbatch_flags(render_sbatch(params, python=PYTHON, folder=FOLDER, map_count=2))


def test_misspelled_resource_fails_with_the_valid_keys() -> None:
    with pytest.raises(TypeError, match="gpus_per_nod"):
        render_sbatch({**train_array_parameters(RES), "gpus_per_nod": 1}, python=PYTHON, folder=FOLDER)


def test_tasks_are_the_cross_product_in_array_order() -> None:
    tasks = expand_tasks(["lora", "casm"], [0, 1], [None], [None], "synthetic", "/runs", ("--set", "a.b=1"))
    assert [(t.method, t.seed) for t in tasks] == [("lora", 0), ("lora", 1), ("casm", 0), ("casm", 1)]
    assert tasks[3].main_args() == ["--method", "casm", "--seed", "1", "--mode", "synthetic", "--run-root", "/runs",
                                    "--set", "a.b=1"]


def test_seed_ranges() -> None:
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    # the command contract's parser: one line for the user (exit 2 through scripts/command.py), no usage dump
    with pytest.raises(BadInput, match="'x' is not an integer or a range like 0-3"):
        make_parser().parse_args(["--methods", "lora", "--seeds", "x"])


# run_job.sh's launch line for one rank, CPU ranks and nodes x GPUs, from faked Slurm variables
# (RUN_JOB_DRY_RUN=1 prints it and exits): pure and fast, no Slurm needed.
RUN_JOB_WORLDS = {
    "one rank (today's line)": {"SLURM_JOB_ID": "41", "SLURM_JOB_NUM_NODES": "1", "SLURM_CPUS_PER_TASK": "8",
                                "SLURM_CPUS_ON_NODE": "8", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_NODELIST": "gpu07"},
    "sbatch --ntasks=2 (CPU ranks)": {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "1", "SLURM_NTASKS": "2",
                                      "SLURM_CPUS_PER_TASK": "1", "SLURM_CPUS_ON_NODE": "2",
                                      "SLURM_JOB_NODELIST": "cpu3"},
    "sbatch --gres=gpu:4 --cpus-per-task=32": {"SLURM_JOB_ID": "43", "SLURM_JOB_NUM_NODES": "1",
                                               "SLURM_CPUS_PER_TASK": "32", "SLURM_CPUS_ON_NODE": "32",
                                               "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu07"},
    "sbatch --nodes=2 --gres=gpu:4 (array task)": {
        "SLURM_JOB_ID": "123456", "SLURM_ARRAY_JOB_ID": "123450", "SLURM_ARRAY_TASK_ID": "3",
        "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "2", "SLURM_CPUS_PER_TASK": "8", "SLURM_CPUS_ON_NODE": "8",
        "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NODELIST": "gpu[07-08]"},
}


def run_job_dry_run(slurm_env: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    # ENV_CMD=env runs `python` from PATH (main.py's line and run_job.sh's `python -m training.rendezvous`)
    env.update(slurm_env, REPO_DIR=str(REPO), RUN_ROOT="/runs", MODE="synthetic", ENV_CMD="env",
               RUN_JOB_DRY_RUN="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(REPO / "run_job.sh"), "lora", "--set", "train.grad_accum=2"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.replace(str(REPO), "/repo")


def test_run_job_launch_lines_match_golden() -> None:
    text = "".join(f"# {name}\n{run_job_dry_run(env)}\n" for name, env in RUN_JOB_WORLDS.items())
    check_golden("run_job_launch.txt", text)


def test_run_job_one_rank_keeps_its_single_task_srun_line() -> None:
    out = run_job_dry_run(RUN_JOB_WORLDS["one rank (today's line)"])
    assert out.splitlines() == [
        "ranks=1 master=:",
        "srun --ntasks=1 --nodes=1 --cpus-per-task=8 --kill-on-bad-exit=1 env python main.py --method lora "
        "--mode synthetic --seed 0 --run-root /runs --set train.grad_accum=2"]


def test_run_job_gpu_ranks_split_the_node_and_meet_on_the_first_host() -> None:
    out = run_job_dry_run(RUN_JOB_WORLDS["sbatch --nodes=2 --gres=gpu:4 (array task)"])
    assert out.startswith("ranks=8 master=gpu07:23456\n")  # 20000 + 123456 % 20000
    assert "srun --ntasks=8 --nodes=2 --ntasks-per-node=4 --cpus-per-task=2 --wait=120 --kill-on-bad-exit=0" in out
    assert "--seed 3" in out  # SEED still follows the array task id


def test_multi_gpu_run_renders_one_task_per_gpu() -> None:
    res = RES.with_updates(gpus_per_node=4, tasks_per_node=4)
    text = render_sbatch(train_array_parameters(res), python=PYTHON, folder=FOLDER, map_count=4)
    check_golden("train_array_4gpus.sbatch", text)
    flags = sbatch_flags(text)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("1", "4", "4")


def test_multi_node_run_renders_tasks_on_every_node() -> None:
    res = RES.with_updates(gpus_per_node=4, tasks_per_node=4, nodes=2)
    text = render_sbatch(train_array_parameters(res), python=PYTHON, folder=FOLDER, map_count=4)
    check_golden("train_array_2nodes_4gpus.sbatch", text)
    flags = sbatch_flags(text)
    assert (flags["nodes"], flags["ntasks-per-node"], flags["gpus-per-node"]) == ("2", "4", "4")


@pytest.mark.parametrize("argv, layout", [
    ([], (1, 1, 1)),  # today: one rank, one GPU
    (["--gpus-per-run", "4"], (1, 4, 4)),
    (["--gpus-per-run", "8", "--nodes", "2"], (2, 4, 4)),
    (["--gpus", "0", "--ranks-per-run", "2"], (1, 2, 0)),  # CPU ranks (the local Slurm test)
])
def test_launch_rank_layout(argv: list[str], layout: tuple[int, int, int]) -> None:
    from scripts.launch import build

    _, res = build(make_parser().parse_args(["--methods", "lora", *argv]), [])
    assert (res.nodes, res.tasks_per_node, res.gpus_per_node) == layout


@pytest.mark.parametrize("argv, message", [
    (["--gpus-per-run", "4", "--nodes", "3"], "do not split evenly over --nodes 3"),
    (["--gpus-per-run", "4", "--ranks-per-run", "2"], "one rank per GPU"),
    (["--gpus", "0", "--ranks-per-run", "2", "--executor", "local"], "need --executor slurm"),
])
def test_launch_rank_layout_errors_say_what_to_change(argv: list[str], message: str) -> None:
    from scripts.launch import build

    with pytest.raises(ValueError, match=message):
        build(make_parser().parse_args(["--methods", "lora", *argv]), [])


def test_each_submitit_task_learns_its_rank_and_the_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.launch import rank_env

    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_", "MASTER_"))]:
        monkeypatch.delenv(key)
    assert rank_env() == {}  # not in a job: one process
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "123457", "SLURM_ARRAY_JOB_ID": "123450",
             "SLURM_ARRAY_TASK_ID": "7",
             "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
             "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    assert rank_env() == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                          "MASTER_PORT": "23457"}
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert rank_env() == {}  # a one-task job is the whole run: nothing to meet
