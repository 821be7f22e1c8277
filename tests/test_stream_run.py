"""A task stream through the whole loop: base row, one row per task with every scorer's numbers, the
same run directory and manifests as the temporal benchmark, exact resume after a SIGKILL, and bad
input refused before anything is written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from artifacts import verify_manifest
from tests.conftest import REPO, comparable, main_cmd, only_run_dir, read_results, run_main, slow_steps
from training import cli

STREAM = str(REPO / "configs" / "streams" / "multidomain-synthetic.yaml")
# Smaller than the preset (it is sized for a one-minute demo): enough steps per task to show learning.
TINY = ["--mode", "synthetic", "--stream", STREAM, "--set", "train.progress=false", "--set", "train.epochs=3",
        "--set", "train.max_batch_size=8", "--set", "eval.batch_size=16"]
TASKS = ["math", "code", "multiple_choice", "style"]


@pytest.fixture(scope="module")
def reference_stream(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stream-reference")
    proc = run_main(*TINY, "--method", "lora", "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(root)
    return {**read_results(run_dir), "run_dir": str(run_dir)}


@pytest.mark.slow
def test_a_stream_run_commits_a_base_row_and_one_row_per_task_with_every_scorer(reference_stream: dict):
    run_dir = Path(reference_stream["run_dir"])
    assert run_dir.name.startswith("multidomain-synthetic-lora-s0-")
    assert reference_stream["kind"] == "stream" and reference_stream["periods"] == TASKS
    m = reference_stream["metrics"]
    assert m["tasks"] == TASKS and len(m["matrix"]) == len(TASKS) + 1  # base row + one per task
    assert all(len(row) == len(TASKS) and all(v is not None for v in row) for row in m["matrix"])
    assert m["primary_metric"] == {"math": "numeric_match", "code": "pass_at_1", "multiple_choice": "acc",
                                   "style": "nll_per_token"}
    assert m["higher_is_better"]["style"] is False and m["higher_is_better"]["math"] is True
    # perplexity is summarised apart from the accuracies
    assert m["lower_is_better_summary"]["num_tasks"] == 1 and m["higher_is_better_summary"]["num_tasks"] == 3
    # every metric of every scorer, for every row
    for task in TASKS:
        for metric, column in m["matrices"][task].items():
            assert len(column) == len(TASKS) + 1, (task, metric)
    names = ["0-base"] + [f"{k}-{t}" for k, t in enumerate(TASKS, start=1)]
    assert sorted(p.name for p in (run_dir / "periods").iterdir()) == names
    for name in names:
        period = run_dir / "periods" / name
        assert verify_manifest(period) == (True, "ok")
        rows = [json.loads(line) for line in (period / "eval" / "predictions.jsonl").read_text().splitlines()]
        assert {r["task"] for r in rows} == set(TASKS) and all("prediction" in r for r in rows)
    assert (run_dir / "data" / "stream.json").is_file()
    # training the style task lowers its held-out loss (the model learns the texts it is trained on)
    style = m["matrices"]["style"]["nll_per_token"]
    assert style[4] < style[3], style


@pytest.mark.slow
def test_sigkill_during_a_stream_then_rerun_equals_the_uninterrupted_run(tmp_path: Path, reference_stream: dict):
    root = tmp_path / "runs"
    proc = subprocess.Popen(main_cmd(*TINY, "--method", "lora", "--set", "checkpoint.every_steps=1",
                                     "--run-root", str(root)),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **slow_steps(0.05)})
    deadline = time.time() + 180
    while not list(root.glob("*/checkpoints/2-code/step-*")):  # in the middle of the second task
        assert time.time() < deadline and proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run_main(*TINY, "--method", "lora", "--run-root", str(root))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in again.stderr
    assert comparable(read_results(only_run_dir(root))) == comparable(reference_stream)


def test_casm_is_refused_on_a_stream_with_the_methods_that_can_run(tmp_path: Path, capsys):
    code = cli.main([*TINY, "--method", "casm", "--run-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "runs only on temporal benchmarks, not on a stream" in err and "valid here: full_ft, lora, smf" in err
    assert not (tmp_path / "runs").exists()


def test_a_bad_stream_file_exits_2_naming_the_file_and_writes_nothing(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntasks:\n  - name: a\n    source: {type: nosuch}\n    scorer: numeric\n")
    code = cli.main(["--mode", "synthetic", "--stream", str(bad), "--run-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert all(line.startswith("error: ") for line in err.splitlines() if line.strip())
    assert "bad.yaml" in err and "nosuch" in err
    assert not (tmp_path / "runs").exists()


def test_method_all_on_a_stream_means_every_method_that_can_run_on_one():
    from training.config import build_run_configs, load_tree
    from training.methods import METHODS

    tree = load_tree(None, "synthetic", {"data.stream": STREAM, "method.name": "all"}, [])
    on_a_stream = [c.method.name for c in build_run_configs(tree, METHODS)]
    assert on_a_stream == [n for n in METHODS if n != "casm"]  # casm parses temporal facts; all others run
    tree = load_tree(None, "synthetic", {"method.name": "all"}, [])
    assert [c.method.name for c in build_run_configs(tree, METHODS)] == list(METHODS)
