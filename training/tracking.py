"""Experiment tracking: TensorBoard, MLflow and Weights & Biases, one tracker run per run directory.

    track.backends: [tensorboard, mlflow, wandb]      (none by default; docs/tracking.md)

A run directory is one tracker run however often it stops: the tracker run id is derived from the run
id (and the run directory's path, so two run roots holding the same run id stay apart), recorded in
<run dir>/tracking.json, and every later process of the run reopens that same tracker run.

The step axis is the run's global optimizer step: the steps of the earlier periods plus the step within
the period (train_log.jsonl records it as `global_step`), so it grows monotonically across periods,
stops and resumes. A resumed run replays the steps after its last checkpoint; each backend keeps one
value per step:
- tensorboard: the writer of a resumed process purges every event at or after the first replayed step
  (SummaryWriter's purge_step), so the curves show the replay's values, once;
- mlflow and wandb keep every value logged, so a resumed process reads back the highest step already
  recorded (MLflow's metric history, W&B's offline run files) and logs only the steps after it. The
  values skipped equal the replay's: a resume reproduces the uninterrupted run bit for bit on the same
  hardware (a resume on another world size may differ in the last bits, and these two keep the first).

Only rank 0 tracks. A backend that fails (server down, disk full, unwritable directory) prints one
warning line and is dropped for the rest of the process; training goes on and the run's own files
stay the record. A backend whose package is missing is a config error naming the extra to install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from artifacts import RunDir, atomic_write_json
from artifacts.rundir import TRACKING_FILE as TRACKING_JSON  # the run directory's layout is spelled there

# train_log.jsonl fields that say where a record is, not what was measured
_POSITION_KEYS = {"event", "period", "step", "global_step"}
# The series a run logs, each with the key every one of its records has: MLflow and W&B find from it the
# last step an earlier process recorded. A period's row and the final metrics share the step where the
# period's training ended with its last train step, so each series keeps its own high-water mark.
SERIES = {"train": "train/loss", "period": "period/index", "final": "final/step"}


def tracker_id(run_id: str, run_dir: Path) -> str:
    """The tracker run id of a run directory: readable (the run id) and unique per directory (W&B and
    MLflow runs live in shared projects, where the same run id under two run roots must not merge)."""
    digest = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return f"{run_id[:55]}-{digest}"


def flatten(values: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers in a nested dict, under '/'-joined keys (lists, strings and None left out)."""
    out: dict[str, float] = {}
    if isinstance(values, dict):
        for key, value in values.items():
            out.update(flatten(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(values, (int, float)) and not isinstance(values, bool) and math.isfinite(values):
        out[prefix] = float(values)
    return out


class Backend:
    """One tracker. `open` creates or reopens the run's record; every method may raise: the Tracker
    turns a failure into one warning line and drops the backend."""

    name = ""
    module = ""  # the import the backend needs; a missing one is a config error naming the extra

    def __init__(self, ctx: TrackContext) -> None:
        self.ctx = ctx

    def record(self) -> dict[str, Any]:
        """Where this backend's record is (tracking.json, main.py status)."""
        raise NotImplementedError

    def log(self, series: str, step: int, values: dict[str, float], label: str = "") -> None:
        """Log one record of a series (SERIES) at a global step; `label` names the period it belongs to."""
        raise NotImplementedError

    def log_config(self, config: dict[str, Any], tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, paths: list[Path]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self, finished: bool) -> None:
        pass


class TrackContext:
    """What a backend needs to know about the run."""

    def __init__(
        self,
        run_id: str,
        run_dir: Path,
        track_dir: Path,
        project: str,
        group: str,
        tags: list[str],
        wandb_mode: Literal["offline", "online", "disabled"],
        mlflow_uri: str,
        purge_from: int | None,
    ) -> None:
        self.run_id = run_id
        self.run_dir = run_dir
        self.track_dir = track_dir
        self.project = project
        self.group = group
        self.tags = tags
        self.wandb_mode = wandb_mode
        self.mlflow_uri = mlflow_uri
        self.id = tracker_id(run_id, run_dir)
        self.purge_from = purge_from  # first global step this process replays (None: nothing to replay)


# -- TensorBoard ---------------------------------------------------------------------------


class TensorBoardBackend(Backend):
    name, module = "tensorboard", "tensorboard"

    def __init__(self, ctx: TrackContext) -> None:
        super().__init__(ctx)
        from torch.utils.tensorboard import SummaryWriter

        # One directory per run under <track dir>/tensorboard: a track.dir shared by the runs of a launch
        # shows methods x seeds side by side. purge_step drops what a killed process logged after its
        # last checkpoint, which this process logs again. Named by the tracker id, as the other backends'
        # runs are: the same run id under two run roots with one track.dir must not merge into one curve.
        self.log_dir = ctx.track_dir / "tensorboard" / ctx.id
        self.writer = SummaryWriter(str(self.log_dir), purge_step=ctx.purge_from, flush_secs=30)

    def record(self) -> dict[str, Any]:
        return {"log_dir": str(self.log_dir), "view": f"tensorboard --logdir {self.log_dir.parent}"}

    def log(self, series: str, step: int, values: dict[str, float], label: str = "") -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        if label:
            self.writer.add_text(f"{series}/name", label, step)
        if series != "train":  # a committed period is never replayed: its row must reach the disk now
            self.writer.flush()

    def log_config(self, config: dict[str, Any], tags: dict[str, str]) -> None:
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, sort_keys=True) + "\n```", 0)
        self.writer.add_text("provenance", "\n".join(f"- {k}: {v}" for k, v in sorted(tags.items())), 0)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.suffix == ".json":
                self.writer.add_text(f"artifacts/{path.name}", "```\n" + path.read_text() + "\n```", 0)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


# -- MLflow --------------------------------------------------------------------------------


class MlflowBackend(Backend):
    name, module = "mlflow", "mlflow"

    def __init__(self, ctx: TrackContext) -> None:
        super().__init__(ctx)
        # MLflow 3 refuses its file store unless asked (it wants a database); we keep it as the default:
        # it opens in milliseconds where sqlite runs its schema migrations for seconds at every start,
        # and sqlite's locking is unreliable on the network file systems run directories live on.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # A tracking server that is down must not stall training: MLflow's default is 7 retries with
        # exponential backoff (minutes per call); fail within seconds and let the Tracker drop the backend.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.uri = ctx.mlflow_uri or (ctx.track_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._experiment()
        # The tracker id is a tag: a process killed before tracking.json named the MLflow run finds it again.
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`clkit.tracker_id` = '{ctx.id}'", max_results=1
        )
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            tags = {"clkit.tracker_id": ctx.id, "clkit.run_id": ctx.run_id, "clkit.run_dir": str(ctx.run_dir)}
            tags.update({f"tag.{t}": "1" for t in ctx.tags})
            if ctx.group:
                tags["clkit.group"] = ctx.group
            self.run_id = self.client.create_run(self.experiment_id, run_name=ctx.run_id, tags=tags).info.run_id
        # MLflow keeps every value logged: steps at or below what is recorded are skipped (see module doc)
        self.logged = {series: self._last_step(key) for series, key in SERIES.items()}

    def _experiment(self) -> str:
        """The project's experiment, created by the first run; the runs of a launch share it and may race to
        create it, so a failed create looks again."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(self.ctx.project)
        if experiment is not None:
            return experiment.experiment_id
        artifacts = None if self.ctx.mlflow_uri else (self.ctx.track_dir / "mlartifacts").resolve().as_uri()
        try:
            return self.client.create_experiment(self.ctx.project, artifact_location=artifacts)
        except MlflowException:
            experiment = self.client.get_experiment_by_name(self.ctx.project)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _last_step(self, key: str) -> int:
        return max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)

    def record(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.uri,
            "experiment": self.ctx.project,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
            "view": f"mlflow ui --backend-store-uri {self.uri}",
        }

    def _log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def log(self, series: str, step: int, values: dict[str, float], label: str = "") -> None:
        if step <= self.logged[series]:
            return
        self._log(step, values)
        if label:
            self.client.set_tag(self.run_id, f"{series}.step.{step}", label)
        self.logged[series] = step

    def log_config(self, config: dict[str, Any], tags: dict[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        # params are the run's identity (never changes across resumes: MLflow refuses a changed param);
        # provenance (host, job, code version) changes with each process and goes to the mutable tags
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in _flat_params(config).items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_batch(self.run_id, tags=[RunTag(f"provenance.{k}", str(v)[:5000]) for k, v in tags.items()])

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, finished: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


def _flat_params(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat_params(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


# -- Weights & Biases ----------------------------------------------------------------------

_WANDB_SERVICE_CHECKED = False


class WandbBackend(Backend):
    name, module = "wandb", "wandb"

    def __init__(self, ctx: TrackContext) -> None:
        super().__init__(ctx)
        os.environ.setdefault("WANDB_SILENT", "true")
        global _WANDB_SERVICE_CHECKED
        if not _WANDB_SERVICE_CHECKED:
            # A W&B service inherited from a parent process (WANDB_SERVICE, set by any process that used
            # wandb) outlives a killed run and keeps its run id open there: the rerun would be refused
            # with "run ID ... is in use". Each main.py process starts its own.
            os.environ.pop("WANDB_SERVICE", None)
            _WANDB_SERVICE_CHECKED = True
        import wandb

        self.dir = ctx.track_dir / "wandb-runs"
        self.dir.mkdir(parents=True, exist_ok=True)
        # Offline by default: compute nodes rarely reach the internet. Each process of the run writes an
        # offline-run-<time>-<id> directory; `wandb sync` uploads them in order into the one run `id`.
        settings = wandb.Settings(
            console="off",
            save_code=False,
            disable_git=True,
            x_disable_stats=True,
            x_save_requirements=False,
            silent=True,
        )
        self.run = wandb.init(
            project=ctx.project,
            id=ctx.id,
            name=ctx.run_id,
            resume="allow",
            mode=ctx.wandb_mode,
            dir=str(self.dir),
            group=ctx.group or None,
            tags=ctx.tags or None,
            settings=settings,
            reinit="create_new",
        )
        # W&B keeps every value logged and wants steps to grow: skip what earlier processes recorded
        recorded = wandb_history(self.dir, ctx.id) if ctx.wandb_mode == "offline" else []
        self.logged = {
            series: max((int(r["_step"]) for r in recorded if key in r), default=-1) for series, key in SERIES.items()
        }
        if ctx.wandb_mode == "online":  # the server knows the resumed run's last step
            self.logged = {series: max(-1, int(self.run.step) - 1) for series in SERIES}

    def record(self) -> dict[str, Any]:
        offline_runs = f"{self.dir}/wandb/offline-run-*-{self.ctx.id}"
        return {
            "dir": str(self.dir),
            "project": self.ctx.project,
            "id": self.ctx.id,
            "mode": self.ctx.wandb_mode,
            "sync": f"wandb sync --id {self.ctx.id} -p {self.ctx.project} {offline_runs}",
        }

    def log(self, series: str, step: int, values: dict[str, float], label: str = "") -> None:
        if step <= self.logged[series]:
            return
        self.run.log({**values, **({f"{series}/name": label} if label else {})}, step=step)
        self.logged[series] = step

    def log_config(self, config: dict[str, Any], tags: dict[str, str]) -> None:
        self.run.config.update({**config, "provenance": tags}, allow_val_change=True)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.run.save(str(path), base_path=str(path.parent), policy="now")
        results = next((p for p in paths if p.name == "results.json"), None)
        if results is not None:
            self.run.summary.update(flatten(json.loads(results.read_text()).get("metrics", {}), "final"))

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of one W&B transaction log (run-<id>.wandb): LevelDB's log format (32 KiB blocks of
    chunks with a 7-byte header: crc, length, type) after W&B's 7-byte file header. A torn tail (a
    killed writer) ends the iteration."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        return
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        if len(chunk) < length:
            return
        pos += 7 + length
        if kind == 1:  # full
            yield chunk
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            yield pending + chunk


def wandb_history(wandb_dir: Path, run_id: str) -> list[dict[str, Any]]:
    """Every history row of the offline runs of `run_id` under a wandb dir, oldest process first."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted((wandb_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")):
        for data in wandb_records(path):
            record = pb.Record()  # type: ignore[attr-defined]  # protoc's module builds its classes at import
            try:
                record.ParseFromString(data)
            except Exception:  # noqa: BLE001 - a torn record from a killed writer: the rest is untrusted
                break
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


# -- the registry and the facade -----------------------------------------------------------

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (TensorBoardBackend, MlflowBackend, WandbBackend)}


def missing_extras(backends: list[str]) -> list[str]:
    """One config problem per requested backend whose package is not installed (checked without importing)."""
    return [
        f"track.backends: {name!r} needs its package; install the extra: uv sync --extra {name} "
        f"(or --extra tracking for all three)"
        for name in backends
        if name in BACKENDS and importlib.util.find_spec(BACKENDS[name].module) is None
    ]


class Tracker:
    """Rank 0's trackers. Opened lazily at the first record, so a resumed process knows where its replay
    starts (resume_at) before a writer exists. Every call is guarded: a failing backend warns once and
    is dropped."""

    def __init__(self, names: list[str], ctx: TrackContext | None, say: Callable[[str], None]) -> None:
        self.names = list(names)
        self.ctx = ctx
        self.say = say
        self.backends: list[Backend] | None = None if names and ctx is not None else []
        self.config: dict[str, Any] = {}
        self.tags: dict[str, str] = {}

    @property
    def active(self) -> bool:
        return self.backends is None or bool(self.backends)

    def resume_at(self, first_step: int) -> None:
        """This process trains from global step `first_step` on (a resume replays from there)."""
        if self.backends is None and self.ctx is not None and self.ctx.purge_from is None:
            self.ctx.purge_from = first_step

    def _open(self) -> list[Backend]:
        if self.backends is not None:
            return self.backends
        assert self.ctx is not None
        self.backends = []
        for name in self.names:
            try:
                self.ctx.track_dir.mkdir(parents=True, exist_ok=True)
                backend = BACKENDS[name](self.ctx)
                backend.log_config(self.config, self.tags)
                self._backfill(backend)
                self.backends.append(backend)
            except Exception as exc:  # noqa: BLE001 - any tracker failure must leave training alone
                self._warn(name, exc)
        self._write_record()
        return self.backends

    def _backfill(self, backend: Backend) -> None:
        """Log what the run's own log holds beyond what this backend recorded. W&B's service writes its
        log in 32 KiB blocks and loses the partial block when the process is killed; the steps up to the
        checkpoint are then in train_log.jsonl (kept up to the checkpoint, truncated after) but would
        never be replayed. Only backends that know their last recorded step (`logged`) take part."""
        logged: dict[str, int] | None = getattr(backend, "logged", None)
        if not logged or self.ctx is None:
            return
        for row in RunDir(self.ctx.run_dir).log_rows():
            step = row.get("global_step")
            if not isinstance(step, int):
                continue
            if row.get("event") == "train" and step > logged["train"]:
                backend.log("train", step, train_values(row))
            elif row.get("event") == "eval" and step > logged["period"]:
                index = int(row.get("period", 0))
                backend.log(
                    "period", step, period_values(index, row.get("scores", {})), f"{index}-{row.get('period_name', '')}"
                )

    def _write_record(self) -> None:
        assert self.ctx is not None
        try:
            atomic_write_json(
                RunDir(self.ctx.run_dir).tracking,
                {
                    "tracker_id": self.ctx.id,
                    "run_id": self.ctx.run_id,
                    "project": self.ctx.project,
                    "group": self.ctx.group,
                    "backends": {b.name: b.record() for b in self.backends or []},
                    "failed": [n for n in self.names if n not in {b.name for b in self.backends or []}],
                },
            )
        except Exception as exc:  # noqa: BLE001
            self.say(f"warning: tracking: cannot write {TRACKING_JSON} ({exc}); training goes on")

    def _warn(self, name: str, exc: BaseException) -> None:
        text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        self.say(
            f"warning: tracking backend {name} failed and is off for this process ({text}); "
            "training goes on, the run directory stays the record"
        )

    def _each(self, call: Callable[[Backend], None]) -> None:
        if not self.active:
            return
        for backend in list(self._open()):
            try:
                call(backend)
            except Exception as exc:  # noqa: BLE001
                self._warn(backend.name, exc)
                self.backends.remove(backend)  # type: ignore[union-attr]

    def log_step(self, step: int, record: dict[str, Any], extra: dict[str, float] | None = None) -> None:
        """One optimizer step: the train_log.jsonl record's numbers under train/ (and `extra`, measures
        that are not in the log such as tokens/s)."""
        if not self.active:
            return
        values = train_values(record, extra)
        self._each(lambda b: b.log("train", step, values))

    def log_period(self, step: int, index: int, name: str, scores: dict[str, Any]) -> None:
        """The score-matrix row after period `index` (named `name`), at the global step where it ended."""
        if not self.active:
            return
        values = period_values(index, scores)
        self._each(lambda b: b.log("period", step, values, f"{index}-{name}"))

    def log_final(self, step: int, metrics: dict[str, Any], artifacts: list[Path]) -> None:
        """The derived metrics (results.json) and the run's summary files, at the end."""
        if not self.active:
            return
        values = {"final/step": float(step), **flatten(metrics, "final")}
        self._each(lambda b: b.log("final", step, values))
        self._each(lambda b: b.log_artifacts([p for p in artifacts if p.is_file()]))

    def flush(self) -> None:
        if self.backends:
            self._each(lambda b: b.flush())

    def close(self, finished: bool) -> None:
        if self.backends:
            self._each(lambda b: b.close(finished))
        self.backends = []


def train_values(record: dict[str, Any], extra: dict[str, float] | None = None) -> dict[str, float]:
    """A train_log.jsonl train record's numbers under train/ (and `extra`, measures the log does not keep)."""
    values = {f"train/{k}": v for k, v in flatten({k: v for k, v in record.items() if k not in _POSITION_KEYS}).items()}
    values["train/period"] = float(record.get("period", 0))
    values.update({f"train/{k}": v for k, v in flatten(extra or {}).items()})
    return values


def period_values(index: int, scores: dict[str, Any]) -> dict[str, float]:
    return {"period/index": float(index), **flatten(scores, "row")}


def open_tracker(
    track: Any,
    run_id: str,
    run_dir: Path,
    is_main: bool,
    say: Callable[[str], None],
    config: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> Tracker:
    """The run's Tracker from the config's `track` section (a NullTracker-like one when off or not rank 0)."""
    if not is_main or not track.backends:
        return Tracker([], None, say)
    track_dir = Path(track.dir).expanduser() if track.dir else run_dir / "tracking"
    ctx = TrackContext(
        run_id,
        run_dir,
        track_dir,
        track.project,
        track.group,
        list(track.tags),
        track.wandb_mode,
        track.mlflow_uri,
        purge_from=None,
    )
    tracker = Tracker(list(dict.fromkeys(track.backends)), ctx, say)
    tracker.config = config or {}
    tracker.tags = tags or {}
    return tracker
