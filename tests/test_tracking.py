"""Experiment tracking (issue 23): the tracker records, read back with each backend's own reader, equal the
run's own files, one value per step, for an uninterrupted run and for one killed and rerun; a failing
tracker changes nothing in the run; a missing extra is one config error.

Readers: TensorBoard's EventAccumulator (which applies purge_step as TensorBoard shows it), MLflow's
MlflowClient over the file store, and W&B's offline transaction logs (run-<id>.wandb: LevelDB log
records of W&B's own protobuf Record, training.tracking.wandb_history).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import (REPO, SMALL, comparable, log_rows, main_cmd, only_run_dir, read_results, run_main,
                            slow_steps)
from training import cli
from training.config import build_run_configs
from training.methods import METHODS
from training.tracking import TrackContext, Tracker, tracker_id, wandb_history

_MISSING = [name for name in ("tensorboard", "mlflow", "wandb") if importlib.util.find_spec(name) is None]
if _MISSING:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {', '.join(_MISSING)} missing: uv sync --extra tracking", pytrace=False)
    pytest.skip(f"tracking extras missing ({', '.join(_MISSING)}): uv sync --extra tracking", allow_module_level=True)

TINY = ["--mode", "synthetic", "--set", "data.num_facts=8", "--set", "train.epochs=2",
        "--set", "train.max_batch_size=4", "--set", "train.progress=false", "--method", "lora"]
TB_MLFLOW = ["--set", "track.backends=[tensorboard,mlflow]"]


# -- readers -----------------------------------------------------------------------------------

def tb_series(log_dir: str | Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(log_dir), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def mlflow_series(record: dict, key: str) -> list[tuple[int, float]]:
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=record["tracking_uri"])
    return [(m.step, m.value) for m in client.get_metric_history(record["run_id"], key)]


def wandb_series(record: dict, key: str) -> list[tuple[int, float]]:
    return [(int(r["_step"]), r[key]) for r in wandb_history(Path(record["dir"]), record["id"]) if key in r]


READERS = {"tensorboard": lambda rec, key: tb_series(rec["log_dir"], key), "mlflow": mlflow_series,
           "wandb": wandb_series}


def one_per_step(series: list[tuple[int, float]]) -> dict[int, float]:
    steps = [s for s, _ in series]
    assert len(steps) == len(set(steps)), f"a step recorded twice: {sorted(steps)}"
    return dict(series)


def log_curve(run_dir: Path, key: str) -> dict[int, float]:
    return {r["global_step"]: r[key] for r in log_rows(run_dir) if r.get("event") == "train"}


def tracking_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "tracking.json").read_text())


def assert_curves_equal(tracker_dir: Path, expected: dict[str, dict[int, float]]) -> None:
    """Every backend in tracker_dir's tracking.json holds each curve once per step with these values."""
    backends = tracking_record(tracker_dir)["backends"]
    for name, record in backends.items():
        for key, curve in expected.items():
            got = one_per_step(READERS[name](record, f"train/{key}"))
            # float32 event files (TensorBoard) hold the log's float64 to 7 digits; the others exactly
            assert got.keys() == curve.keys(), (name, key, sorted(got), sorted(curve))
            for step, value in curve.items():
                assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key, step)


# -- in-process runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tiny run without tracking, with TensorBoard and MLflow, and with both pointed at a
    directory that cannot be created (its parent is a file: unwritable even for root)."""
    base = tmp_path_factory.mktemp("tracking")
    blocker = base / "not-a-dir"
    blocker.write_text("a file where the tracker directory's parent should be\n")
    out = {}
    for name, extra in {"plain": [], "tracked": TB_MLFLOW,
                        "unwritable": [*TB_MLFLOW, "--set", f"track.dir={blocker}/tracking"]}.items():
        assert cli.main([*TINY, "--run-root", str(base / name), *extra]) == 0, name
        out[name] = only_run_dir(base / name)
    return out


def test_uninterrupted_run_tracker_curves_equal_train_log_and_results(runs):
    tracked = runs["tracked"]
    assert tracked.name == runs["plain"].name, "track.* is a runtime section: the run id does not change"
    assert comparable(read_results(tracked)) == comparable(read_results(runs["plain"]))
    assert not (runs["plain"] / "tracking.json").exists() and not (runs["plain"] / "tracking").exists()
    record = tracking_record(tracked)
    assert record["tracker_id"] == tracker_id(tracked.name, tracked) and set(record["backends"]) == {
        "tensorboard", "mlflow"}
    steps = sorted(log_curve(tracked, "loss"))
    assert steps == list(range(1, len(steps) + 1)), "global steps count on across periods"
    assert_curves_equal(tracked, {k: log_curve(tracked, k) for k in ("loss", "lr", "grad_norm")})
    # period rows and derived metrics equal results.json: the rows at the step where each period ended
    results = read_results(tracked)
    metrics, names = results["metrics"], results["periods"]
    ends = [0]  # the base row at step 0, then each period's row at its last step
    for k in range(1, len(names) + 1):
        ends.append(max(r["global_step"] for r in log_rows(tracked) if r.get("event") == "train" and r["period"] == k))
    for name, rec in record["backends"].items():
        read = READERS[name]
        assert [s for s, _ in read(rec, "period/index")] == ends, name
        for j, period in enumerate(names):
            row = one_per_step(read(rec, f"row/{period}/storage/em"))
            assert [row[ends[k]] for k in range(len(ends))] == pytest.approx(
                [metrics["matrix_storage_em"][k][j] for k in range(len(ends))]), (name, period)
        for key in ("acc_storage", "bwt_storage", "forgetting_storage", "acc_extraction_f1"):
            assert one_per_step(read(rec, f"final/{key}")) == {ends[-1]: pytest.approx(metrics[key])}, (name, key)
    # MLflow: the identity config as params, provenance as tags, the run finished, results.json kept
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=record["backends"]["mlflow"]["tracking_uri"])
    run = client.get_run(record["backends"]["mlflow"]["run_id"])
    assert run.data.params["seed"] == "0" and run.data.params["method.name"] == "lora"
    assert run.data.tags["provenance.run_id"] == tracked.name and run.info.status == "FINISHED"
    assert "results.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_unwritable_tracker_directory_leaves_results_identical_to_an_untracked_run(runs, capsys):
    unwritable = runs["unwritable"]
    assert comparable(read_results(unwritable)) == comparable(read_results(runs["plain"]))
    assert [r for r in log_rows(unwritable) if r.get("event") == "train"] and not (unwritable / "tracking").exists()
    record = tracking_record(unwritable)
    assert record["backends"] == {} and record["failed"] == ["tensorboard", "mlflow"]


def test_a_failing_backend_warns_once_and_training_goes_on(tmp_path):
    lines: list[str] = []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ctx = TrackContext("r", tmp_path, blocker / "sub", "clkit", "", [], "offline", "", None)
    tracker = Tracker(["tensorboard", "mlflow"], ctx, lines.append)
    for step in range(1, 4):
        tracker.log_step(step, {"event": "train", "loss": 1.0})
    tracker.close(True)
    assert len(lines) == 2 and all(line.startswith("warning: tracking backend ") for line in lines), lines
    assert "training goes on" in lines[0]
    # an MLflow server that is down: one warning within seconds, not MLflow's minutes of retries
    lines.clear()
    ctx = TrackContext("r", tmp_path, tmp_path / "t", "clkit", "", [], "offline", "http://127.0.0.1:9", None)
    tracker = Tracker(["mlflow"], ctx, lines.append)
    started = time.time()
    for step in range(1, 4):
        tracker.log_step(step, {"event": "train", "loss": 1.0})
    assert time.time() - started < 15 and len(lines) == 1 and "mlflow failed" in lines[0], lines


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow", pytest.param("wandb", marks=pytest.mark.slow)])
def test_a_resumed_process_continues_the_same_tracker_run_one_value_per_step(tmp_path, backend):
    """Process 1 logs steps 1..10 and dies (its checkpoint was step 6); process 2 replays 7..12."""
    def process(first: int, last: int, resume_at: int | None, offset: float) -> None:
        ctx = TrackContext("run-a", tmp_path / "run", tmp_path / "track", "clkit", "g", ["t"], "offline", "", None)
        tracker = Tracker([backend], ctx, lambda m: pytest.fail(m))
        if resume_at is not None:
            tracker.resume_at(resume_at)
        for step in range(first, last + 1):
            tracker.log_step(step, {"event": "train", "loss": step + offset})
        tracker.close(finished=False)

    (tmp_path / "run").mkdir()
    process(1, 10, None, 0.0)
    first_record = tracking_record(tmp_path / "run")
    if backend == "wandb":  # W&B names offline directories by the second: two processes are seconds apart
        time.sleep(1.1)
    process(7, 12, 7, 0.5)
    record = tracking_record(tmp_path / "run")
    assert record == first_record, "the second process found and reused the same tracker run"
    got = one_per_step(READERS[backend](record["backends"][backend], "train/loss"))
    assert sorted(got) == list(range(1, 13))
    # TensorBoard shows the replay's values (purge_step); MLflow and W&B keep the first value of a step
    # they already hold (a real replay reproduces it bit for bit, see the kill test below)
    replayed = 0.5 if backend == "tensorboard" else 0.0
    assert got == {s: s + (replayed if 7 <= s <= 10 else 0.5 if s > 10 else 0.0) for s in range(1, 13)}


def test_a_missing_backend_package_is_one_config_error_naming_the_extra(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code = cli.main([*TINY, "--run-root", str(tmp_path / "runs"), "--set", "track.backends=[tensorboard,wandb]"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert "track.backends" in err[0] and "uv sync --extra wandb" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_the_track_section_never_changes_the_run_id():
    (plain,) = build_run_configs({"method": {"name": "lora"}}, METHODS)
    (tracked,) = build_run_configs({"method": {"name": "lora"}, "track": {
        "backends": ["tensorboard"], "project": "p", "tags": ["a"], "wandb_mode": "online", "dir": "/x"}}, METHODS)
    assert tracked.config_hash() == plain.config_hash() and tracked.default_run_id() == plain.default_run_id()


# -- a run killed at a random step and rerun ---------------------------------------------------

ALL = ["--set", "track.backends=[tensorboard,mlflow,wandb]", "--set", "track.group=kill-test", "--set",
       "track.tags=[t1]"]
# a checkpoint every 4 steps and a kill at a step that is not a multiple of 4: the rerun replays steps
SLOW = ["--set", "checkpoint.every_steps=4", "--set", "checkpoint.every_seconds=0"]
SLEEP = slow_steps(0.1)


@pytest.mark.slow
def test_sigkill_at_a_random_step_and_rerun_gives_the_uninterrupted_curves(tmp_path, reference_lora):
    root = tmp_path / "runs"
    cmd = main_cmd(*SMALL, *SLOW, *ALL, "--method", "lora", "--run-root", str(root))
    # one step after a checkpoint: the kill lands there or a step or two later (polling), before the next one
    target = random.Random().choice([5, 9])
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **SLEEP})
    deadline = time.time() + 120
    while time.time() < deadline:
        rows = log_rows(only_run_dir(root)) if root.exists() and any(root.iterdir()) else []
        if sum(1 for r in rows if r.get("event") == "train" and r["period"] == 2) >= target:
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_dir = only_run_dir(root)
    logged_before = max(r["global_step"] for r in log_rows(run_dir) if r.get("event") == "train")
    done = run_main(*SMALL, *SLOW, *ALL, "--method", "lora", "--run-root", str(root), env=SLEEP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: tracking" not in done.stderr, done.stderr[-2000:]
    resumed = [r for r in log_rows(run_dir) if r.get("event") == "resume"]
    assert resumed and resumed[0]["period"] == 2 and resumed[0]["from_step"] % 4 == 0
    period1 = sum(1 for r in log_rows(run_dir) if r.get("event") == "train" and r["period"] == 1)
    assert logged_before > period1 + resumed[0]["from_step"], "the rerun replays steps the killed process logged"
    reference = Path(reference_lora["run_dir"])
    expected = {k: log_curve(reference, k) for k in ("loss", "lr", "grad_norm")}
    assert log_curve(run_dir, "loss") == expected["loss"]
    assert_curves_equal(run_dir, expected)
    record = tracking_record(run_dir)
    assert set(record["backends"]) == {"tensorboard", "mlflow", "wandb"}
    # W&B: one run id over both processes (two offline directories to sync into it), its group and tags
    wb = record["backends"]["wandb"]
    offline = sorted((Path(wb["dir"]) / "wandb").glob(f"offline-run-*-{wb['id']}"))
    assert len(offline) == 2, offline
    from wandb.proto import wandb_internal_pb2 as pb

    from training.tracking import wandb_records

    runs = []
    for directory in offline:
        for data in wandb_records(directory / f"run-{wb['id']}.wandb"):
            rec = pb.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "run":
                runs.append((rec.run.run_id, rec.run.project, rec.run.run_group, list(rec.run.tags)))
    assert runs == [(wb["id"], "clkit", "kill-test", ["t1"])] * 2


def test_status_prints_where_each_runs_tracker_record_is(runs, capsys):
    from scripts import status

    assert status.main([str(runs["tracked"].parent)]) == 0
    out = capsys.readouterr().out
    record = tracking_record(runs["tracked"])["backends"]
    line = next(line for line in out.splitlines() if line.startswith(f"  {runs['tracked'].name}: "))
    assert record["tensorboard"]["log_dir"] in line and record["mlflow"]["run_id"] in line, out
    assert status.main([str(runs["plain"].parent), "--json"]) == 0
    plain = capsys.readouterr().out
    assert '"tracking"' not in plain and status.main([str(runs["plain"].parent)]) == 0
    assert "trackers" not in capsys.readouterr().out


def test_a_launch_groups_its_runs_in_one_tracking_dir_without_changing_run_ids(tmp_path):
    from scripts import launch

    args = launch.make_parser().parse_args(["--methods", "lora,ewc", "--seeds", "0-1", "--mode", "synthetic",
                                            "--run-root", str(tmp_path), "--job-name", "sweep7"])
    tasks, _ = launch.build(args, ["--set", "track.tags=[x]"])
    configs = [cli.parse_configs(t.main_args())[0] for t in tasks]
    assert {(c.track.group, c.track.dir, tuple(c.track.tags)) for c in configs} == {
        ("sweep7", f"{tmp_path.resolve()}/tracking", ("x",))}
    plain = [cli.parse_configs(["--method", t.method, "--seed", str(t.seed), "--mode", "synthetic"])[0] for t in tasks]
    assert [c.resolved_run_id() for c in configs] == [c.resolved_run_id() for c in plain]
    # arguments after -- win over the launch's defaults
    tasks, _ = launch.build(args, ["--set", "track.group=mine"])
    assert cli.parse_configs(tasks[0].main_args())[0].track.group == "mine"


@pytest.mark.slow
def test_a_run_stopped_on_one_process_and_finished_on_two_ranks_keeps_one_tracker_run_written_by_rank_0(tmp_path):
    from tests.test_distributed import run_ranks

    root = tmp_path / "runs"
    args = [*SMALL, "--set", "train.epochs=2", "--set", "train.grad_accum=2",
            "--set", "checkpoint.every_steps=3", *ALL, "--method", "lora", "--run-root", str(root)]
    proc = subprocess.Popen(main_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **SLEEP})
    deadline = time.time() + 120
    while not (root.exists() and any(root.iterdir())
               and sum(1 for r in log_rows(only_run_dir(root)) if r.get("event") == "train") >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.stderr else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 75
    done = run_ranks(*args, env=SLEEP)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("warning: tracking") == 0, done.stderr[-2000:]
    run_dir = only_run_dir(root)
    assert_curves_equal(run_dir, {k: log_curve(run_dir, k) for k in ("loss", "lr", "grad_norm")})
    backends = tracking_record(run_dir)["backends"]
    # one writer per process: the first process and rank 0 of the second, never rank 1
    assert len(list(Path(backends["tensorboard"]["log_dir"]).glob("events.out.tfevents.*"))) == 2
    assert len(list((Path(backends["wandb"]["dir"]) / "wandb").glob("offline-run-*"))) == 2
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=backends["mlflow"]["tracking_uri"])
    assert [r.info.run_id for r in client.search_runs([backends["mlflow"]["experiment_id"]])] == [
        backends["mlflow"]["run_id"]]


def test_the_same_run_id_under_two_run_roots_with_one_track_dir_keeps_two_tensorboard_runs(tmp_path: Path) -> None:
    from training.tracking import BACKENDS

    dirs = []
    for root in ("uninterrupted", "killed"):
        ctx = TrackContext("temporalwiki-lora-s0-0123abcd", tmp_path / root / "temporalwiki-lora-s0-0123abcd",
                           tmp_path / "shared", "clkit", "", [], "offline", "", purge_from=None)
        backend = BACKENDS["tensorboard"](ctx)
        dirs.append(backend.log_dir)
        backend.close(True)
    assert dirs[0] != dirs[1] and dirs[0].parent == dirs[1].parent == tmp_path / "shared" / "tensorboard"
