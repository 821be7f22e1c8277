"""The sbatch text launch.py submits, pinned by golden files (tests/slurm/golden/).

The text is submitit's own rendering of our parameters, so this also catches a submitit upgrade that
changes the job script. After an intended change: UPDATE_GOLDEN=1 uv run pytest tests/test_slurm_render.py
and review the diff of the golden files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from scripts.launch import make_parser, parse_seeds
from scripts.slurm_render import (SlurmResources, expand_tasks, render_sbatch, report_parameters,
                                  train_array_parameters)

GOLDEN = Path(__file__).parent / "slurm" / "golden"
PYTHON = "/repo/.venv/bin/python"
FOLDER = "/repo/logs/submitit/%j"
RES = SlurmResources(job_name="clkit", time_min=720, cpus_per_task=8, mem_gb=64, gpus_per_node=1,
                     partition="gpu", account=None, qos=None, signal_delay_s=300, array_parallelism=2,
                     extra=(("constraint", "a100"),), setup=("module load cuda/12.1",), pythonpath="/repo")


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


def test_seed_ranges(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_seeds("0-2,7") == [0, 1, 2, 7]
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--methods", "lora", "--seeds", "x"])
    assert "'x' is not an integer or a range like 0-3" in capsys.readouterr().err
