"""Reading and verifying run directories: one `Run` per directory, never raising.

Only committed, verified periods count (docs/reports.md; the package docstring has the rules); the
metrics of a complete run are re-derived from its committed predictions and results.json is only
cross-checked.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from artifacts import (
    MANIFEST_NAME,
    RunDir,
    live_holder,
    read_jsonl,
    read_manifest,
    verify_manifest,
)
from artifacts.identity import identity_tree
from artifacts.rundir import (
    EVAL_DIR,
    LANDSCAPE_DIR,
    LANDSCAPE_FILE,
    LM_EVAL_DIR,
    LM_EVAL_FILE,
    PERIODS_DIR,
    PREDICTIONS_FILE,
    SCORES_FILE,
    period_dir_name,
)
from data.io import BENCHMARK_FILE, read_benchmark
from data.schema import Benchmark
from data.streams.schema import STREAM_FILE, Stream
from eval_and_metrics.metrics import derive_metrics, score_matrix
from eval_and_metrics.report.records import (
    ANSWER_VIEWS,
    FAMILIES,
    SCALAR_KEYS,
    STREAM_CHECKED_KEYS,
    PeriodRow,
    Run,
)
from eval_and_metrics.retention import RETENTION_FILE
from eval_and_metrics.retention import recompute as recompute_retention
from eval_and_metrics.stream_metrics import derive_from_summaries, row_summary

# ------------------------------------------------------------------------------------------
# reading one run


def _scorer_registry() -> dict[str, Any]:
    """eval_and_metrics.scorers.SCORERS, imported on first use: the scorers import torch (seconds), which
    a report of temporal runs never needs."""
    from eval_and_metrics.scorers import SCORERS

    return SCORERS


@dataclass(frozen=True)
class StreamData:
    """A run's data/stream.json with what re-deriving its metrics needs: a scorer per task and the ids of
    every task's eval items (each row must score exactly those)."""

    stream: Stream
    scorers: dict[str, Any]  # task name -> scorer instance (only `metrics` and `aggregate` are used)
    eval_ids: dict[str, frozenset[str]]

    @property
    def task_names(self) -> list[str]:
        return self.stream.task_names

    @classmethod
    def from_stream(cls, stream: Stream) -> StreamData:
        registry = _scorer_registry()
        unknown = [
            f"task {t.name!r}: scorer {t.scorer!r} is not registered" for t in stream.tasks if t.scorer not in registry
        ]
        if unknown:
            raise ValueError(f"data/{STREAM_FILE}: " + "; ".join(unknown) + f" (valid: {', '.join(registry)})")
        return cls(
            stream=stream,
            scorers={t.name: registry[t.scorer]() for t in stream.tasks},
            eval_ids={t.name: frozenset(x.id for x in t.eval) for t in stream.tasks},
        )

    def summarise(self, preds: list[dict[str, Any]], where: str) -> dict[str, dict[str, Any]]:
        """One row's {task: metrics} re-aggregated from its predictions, after checking that they score
        every eval item of every task exactly once (a row that scored other items than another row is
        not comparable with it: the same trap as probes missing from a temporal row)."""
        seen: dict[str, set[str]] = {t: set() for t in self.task_names}
        for row in preds:
            task, item = row.get("task"), row.get("id")
            if task not in seen:
                raise ValueError(f"{where}: row {item!r} is of task {task!r}, which data/{STREAM_FILE} does not have")
            if item not in self.eval_ids[task]:
                raise ValueError(f"{where}: task {task!r}: row {item!r} is not one of its eval items")
            if item in seen[task]:
                raise ValueError(f"{where}: task {task!r}: eval item {item!r} is scored twice")
            seen[task].add(item)
        for task in self.task_names:
            missing = sorted(self.eval_ids[task] - seen[task])
            if missing:
                raise ValueError(
                    f"{where}: task {task!r}: {len(missing)} eval item(s) without a prediction, first {missing[0]!r}"
                )
        return row_summary(self.task_names, self.scorers, preds)


class _BenchmarkCache:
    """read_benchmark is strict (it recomputes the fingerprint); a sweep shares one file content."""

    def __init__(self) -> None:
        self._by_digest: dict[str, Benchmark] = {}
        self._streams: dict[str, StreamData] = {}

    def load(self, directory: Path) -> Benchmark:
        raw = (directory / BENCHMARK_FILE).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest not in self._by_digest:
            self._by_digest[digest] = read_benchmark(directory)
        return self._by_digest[digest]

    def load_stream(self, directory: Path) -> StreamData:
        """data/stream.json as a Stream (strict: unknown or missing keys raise); its fingerprint is
        recomputed from the content, so the manifests' data_fingerprint check means something."""
        raw = _read_text(directory / STREAM_FILE)
        digest = hashlib.sha256(raw.encode()).hexdigest()
        if digest not in self._streams:
            self._streams[digest] = StreamData.from_stream(Stream.from_json(json.loads(raw)))
        return self._streams[digest]


def _dir_token(directory: Path) -> tuple[int, int] | None:
    try:
        return directory.stat().st_ino, (directory / MANIFEST_NAME).stat().st_mtime_ns
    except OSError:
        return None


def verify_stable(directory: Path, attempts: int = 3) -> tuple[bool | None, str]:
    """verify_manifest that tells a damaged dir from one replaced while we read it.

    (True, "ok"), (False, reason) for a dir that fails twice in the same state, or (None, reason)
    when the dir vanished (a writer is re-committing it): such a dir is simply not counted.
    """
    reason = "not checked"
    for _ in range(attempts):
        before = _dir_token(directory)
        if before is None:
            return None, "vanished while reading"
        ok, reason = verify_manifest(directory)
        if ok:
            return True, reason
        after = _dir_token(directory)
        if after is None:
            return None, "vanished while reading"
        if after == before:
            return False, reason
        time.sleep(0.1)
    return False, reason


def _read_text(path: Path) -> str:
    """A file's text, never through a symbolic link: run dirs on shared scratch may hold planted links,
    and the report must not copy a file from outside a run into its pages (ELOOP -> OSError)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as fh:
        return fh.read().decode("utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(_read_text(path))


def variant_tree(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the run identity sees it (artifacts/identity.py: no run_root, run_id, runtime settings,
    checkpointing or tracking), minus the seed: runs with equal trees are seeds of one setup."""
    tree = json.loads(json.dumps(config, default=str))  # a copy, and dates etc. as the strings yaml gave
    tree.pop("seed", None)
    return identity_tree(tree)


def variant_of(config: dict[str, Any]) -> str:
    """Hash of variant_tree: runs with one variant are seeds of one setup."""
    return hashlib.sha256(json.dumps(variant_tree(config), sort_keys=True).encode()).hexdigest()[:8]


def model_label(config: dict[str, Any]) -> str:
    model = config.get("model") or {}
    if config.get("mode") == "synthetic":
        return f"synthetic-llama(h{model.get('synthetic_hidden_size')},l{model.get('synthetic_layers')})"
    name = model.get("name") or "SmolLM2-135M-Instruct (embedded)"
    if model.get("quantize") not in (None, "none"):
        name += f" [{model['quantize']}]"
    return name


def _last_event(run_dir: Path, stage_names: Sequence[str] | None = None) -> str:
    """A short description of the newest train_log record (cheap: RunDir.last_record reads the last 4 KiB).

    stage_names: a stream's task names; its log records carry the task's index as "period", which is
    shown as "task k (name)"."""
    rec = RunDir(run_dir).last_record()
    if rec is None:
        return ""
    k = rec.get("period", "?")
    if stage_names is None:
        bits = [str(rec.get("event", "?")), f"period {k}"]
    else:
        name = (["base"] + list(stage_names))[k] if isinstance(k, int) and 0 <= k <= len(stage_names) else "?"
        bits = [str(rec.get("event", "?")), f"task {k} ({name})"]
    if "step" in rec:
        bits.append(f"step {rec['step']}")
    return "last log event: " + " ".join(bits)


def _step_checkpoints(run_dir: Path) -> str:
    """The newest step checkpoint of each period that has one, e.g. "step checkpoint 2-2020/step-00000040"."""
    found = []
    try:
        for _, root in RunDir(run_dir).checkpoint_entries():
            steps = sorted(s for s in os.listdir(root) if s.startswith("step-"))
            if steps:
                found.append(f"{root.name}/{steps[-1]}")
    except OSError:
        return ""
    return ("step checkpoint " + ", ".join(found)) if found else ""


def _read_subresult(row_dir: Path, sub: str, filename: str, run: Run, label: str) -> dict[str, Any] | None:
    directory = row_dir / sub
    if not directory.is_dir():
        return None
    ok, reason = verify_stable(directory)
    if ok is None:
        return None
    if not ok:
        run.warnings.append(f"{row_dir.name}/{sub} ignored ({label}): {reason}")
        return None
    try:
        return _read_json(directory / filename)
    except (OSError, ValueError) as exc:
        run.warnings.append(f"{row_dir.name}/{sub} ignored ({label}): {exc}")
        return None


def _read_row(
    directory: Path, k: int, name: str, run: Run, attempts: int = 3, stream: StreamData | None = None
) -> tuple[PeriodRow, dict[str, Any]] | str | None:
    """Verify one period dir and read it, all within one unchanged state of the dir.

    For a stream run (`stream` given) the row's predictions are checked against the stream's eval
    items and re-aggregated per task; a row that does not score exactly those items raises ValueError
    (the run is then listed as failed, like a temporal row missing a probe).

    Returns (row, manifest), a reason string when the dir is damaged, or None when it vanished or
    kept being replaced while we read (a writer re-committing it): such a row does not count.
    """
    for _ in range(attempts):
        ok, reason = verify_stable(directory)
        if ok is None:
            return None
        if not ok:
            return reason
        token = _dir_token(directory)
        try:
            manifest = read_manifest(directory) or {}
            scores = _read_json(directory / EVAL_DIR / SCORES_FILE)
            preds = read_jsonl(directory / EVAL_DIR / PREDICTIONS_FILE)
        except (OSError, ValueError):
            if _dir_token(directory) == token:
                raise
            continue
        if _dir_token(directory) != token:
            continue
        common: dict[str, Any] = {
            "index": k,
            "name": name,
            "scores": scores.get("by_period") or {},
            "extras": scores.get("extras") or {},
            "train": manifest.get("train") or {},
            "trainable_sha256": manifest.get("trainable_sha256"),
        }
        if stream is None:
            row = PeriodRow(
                **common,
                em={r["id"]: r["em"] for r in preds},
                f1={r["id"]: r["f1"] for r in preds},
                logprob={r["id"]: r["logprob"] for r in preds},
                prediction={r["id"]: r["prediction"] for r in preds},
            )
        else:
            where = f"{PERIODS_DIR}/{directory.name}/{EVAL_DIR}/{PREDICTIONS_FILE}"
            row = PeriodRow(**common, task_scores=stream.summarise(preds, where))
            # scores.json is in the manifest, so it can only disagree if whatever wrote it aggregated differently
            diffs = _differences(row.task_scores, row.scores, "")
            if diffs:
                run.warnings.append(
                    f"{PERIODS_DIR}/{directory.name}/{EVAL_DIR}/{SCORES_FILE} disagrees with its "
                    "re-aggregated predictions (used the latter): " + "; ".join(d.lstrip(".") for d in diffs[:4])
                )
        if (directory / EVAL_DIR / RETENTION_FILE).is_file():  # in the manifest: verified above
            row.retention = read_jsonl(directory / EVAL_DIR / RETENTION_FILE)
        row.landscape = _read_subresult(directory, LANDSCAPE_DIR, LANDSCAPE_FILE, run, "loss landscape")
        row.lm_eval = _read_subresult(directory, LM_EVAL_DIR, LM_EVAL_FILE, run, "lm-eval")
        return row, manifest
    return None


def _recompute_metrics(run: Run, bench: Benchmark) -> dict[str, Any]:
    probes = bench.all_probes()
    metrics = derive_metrics(
        [r.em for r in run.rows], [r.f1 for r in run.rows], probes, bench.period_names, [r.prediction for r in run.rows]
    )
    for family in FAMILIES:

        def of_family(p: Any, family: str = family) -> bool:
            return bool(p.family == family)

        logprob = score_matrix([r.logprob for r in run.rows], probes, bench.period_names, select=of_family)
        metrics[f"matrix_{family}_logprob"] = [[None if math.isnan(v) else float(v) for v in row] for row in logprob]
    return metrics


def _recompute_stream_metrics(run: Run, stream: StreamData) -> dict[str, Any]:
    tasks = stream.stream.tasks
    return derive_from_summaries(
        [t.name for t in tasks],
        [t.scorer for t in tasks],
        stream.scorers,
        [len(t.eval) for t in tasks],
        [r.task_scores for r in run.rows],
    )


def _recompute_retention(run: Run) -> None:
    """The retention track's metrics from the committed rows, with the scorers results.json names."""
    if run.metrics is None or not all(r.retention is not None for r in run.rows):
        return
    try:
        saved = (_read_json(RunDir(run.path).results).get("metrics") or {}).get("retention")
        if saved:
            run.metrics["retention"] = recompute_retention(saved, [r.retention or [] for r in run.rows])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        run.warnings.append(f"retention track not recomputed ({type(exc).__name__}: {exc})")


def _differences(ours: Any, theirs: Any, path: str) -> list[str]:
    """Where two JSON trees differ ("path theirs vs ours"); numbers are equal within 1e-9 (relative
    above 1: perplexities are large)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        out: list[str] = []
        for key in sorted(set(ours) | set(theirs), key=str):
            out += _differences(ours.get(key), theirs.get(key), f"{path}.{key}")
        return out
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        out = []
        for i, (a, b) in enumerate(zip(ours, theirs)):
            out += _differences(a, b, f"{path}[{i}]")
        return out
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ours, theirs))
    if numbers and abs(float(ours) - float(theirs)) <= 1e-9 * max(1.0, abs(float(ours))):
        return []
    return [] if not numbers and ours == theirs else [f"{path} {theirs} vs {ours}"]


def _cross_check_results(run: Run) -> None:
    """results.json is outside every manifest: compare it with what the committed files say."""
    path = RunDir(run.path).results
    if not path.exists():
        run.warnings.append("results.json missing (metrics recomputed from the committed periods)")
        return
    try:
        saved = _read_json(path)
    except (OSError, ValueError) as exc:
        run.warnings.append(f"results.json unreadable ({exc}); metrics recomputed from the committed periods")
        return
    ours = run.metrics or {}
    theirs = saved.get("metrics") or {}
    diffs = []
    if run.kind == "stream":
        if saved.get("kind") != "stream":
            diffs.append(f"kind {saved.get('kind')} vs stream")
        for key in STREAM_CHECKED_KEYS:
            diffs += _differences(ours.get(key), theirs.get(key), key)
    for key in SCALAR_KEYS if run.kind == "temporal" else ():
        if key.startswith(ANSWER_VIEWS) and key not in theirs:
            continue  # written before the answer kinds existed: nothing to disagree with
        a, b = ours.get(key), theirs.get(key)
        if (a is None) != (b is None) or (a is not None and b is not None and abs(float(a) - float(b)) > 1e-9):
            diffs.append(f"{key} {b} vs {a}")
    last = run.rows[-1].trainable_sha256
    if saved.get("final_state_sha256") and last and saved["final_state_sha256"] != last:
        diffs.append("final_state_sha256 differs from the last period's trainable_sha256")
    if diffs:
        run.warnings.append(
            "results.json disagrees with the committed predictions (used the latter): " + "; ".join(diffs[:4])
        )


class _InFlux(Exception):
    """A period dir was replaced while we read it; reading the run again gives a consistent view."""


def read_run(path: Path, benches: _BenchmarkCache | None = None, attempts: int = 3) -> Run:
    """Everything the report needs from one run directory; never raises (errors become status failed)."""
    benches = benches or _BenchmarkCache()
    for attempt in range(attempts):
        run = Run(run_id=path.name, path=path)
        try:
            _read_run(run, benches)
            return run
        except _InFlux as exc:
            if attempt + 1 == attempts:
                run.status, run.metrics = "running", None
                run.reason = f"{exc} {attempts} times (a writer is re-committing it); run the report again"
                return run
            time.sleep(0.2)
        except Exception as exc:  # noqa: BLE001 -- a report must list a broken run, not die on it
            run.status = "failed"
            run.reason = f"unreadable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            run.metrics = None
            return run
    return run


def _confidence_trace(run_dir: Path, committed: int) -> list[tuple[int, int, float, bool]]:
    """CASMO's confidence per optimizer step of the committed periods (train_log.jsonl), in order."""
    try:
        rows = RunDir(run_dir).log_rows()
    except (OSError, ValueError):
        return []
    trace = [
        (int(r["period"]), int(r["step"]), float(r["casmo_confidence"]), bool(r.get("casmo_calibrating")))
        for r in rows
        if r.get("event") == "train" and "casmo_confidence" in r and r.get("period", 0) <= committed
    ]
    return sorted(trace)


def _read_run(run: Run, benches: _BenchmarkCache) -> None:
    path = run.path
    rundir = RunDir(path)
    if not rundir.config.is_file():
        run.reason = "no config.yaml (the run never got past validation)"
        return
    config = yaml.safe_load(_read_text(rundir.config))
    if not isinstance(config, dict):
        run.reason = "config.yaml is not a mapping"
        return
    run.config = config
    run.method = str((config.get("method") or {}).get("name", "?"))
    run.seed = config.get("seed")
    run.mode = str(config.get("mode", "?"))
    run.model = model_label(config)
    run.variant = variant_of(config)
    data_cfg = config.get("data") or {}
    stream: StreamData | None = None
    bench: Benchmark | None = None
    # A stream run keeps data/stream.json; its config names the stream file (absent for temporal runs).
    if (rundir.data / STREAM_FILE).is_file() or data_cfg.get("stream"):
        run.kind = "stream"
        if not (rundir.data / STREAM_FILE).is_file():
            run.reason = f"data/{STREAM_FILE} missing (the run never committed its data)"
            run.benchmark = Path(str(data_cfg.get("stream"))).stem
            return
        stream = benches.load_stream(rundir.data)
        run.benchmark, run.fingerprint = stream.stream.name, stream.stream.fingerprint
        run.period_names, run.stream_order = stream.task_names, stream.stream.order
    elif not (rundir.data / BENCHMARK_FILE).is_file():
        run.reason = f"data/{BENCHMARK_FILE} missing (the run never committed its data)"
        run.benchmark = str(data_cfg.get("benchmark", "?"))
        return
    else:
        bench = benches.load(rundir.data)
        run.benchmark, run.fingerprint, run.period_names = bench.name, bench.fingerprint, bench.period_names

    run_meta: dict[str, Any] = {}
    try:
        run_meta = _read_json(rundir.run_meta)
    except (OSError, ValueError):
        pass
    expected_hash = run_meta.get("config_hash")
    names = ["base"] + run.period_names
    problem = ""
    periods_dir = rundir.periods
    for k, name in enumerate(names):
        directory = rundir.period_dir(k, name)
        if not directory.is_dir():
            break
        got = _read_row(directory, k, name, run, stream=stream)
        if got is None:  # vanished or kept changing while read: a writer is re-committing it
            raise _InFlux(f"periods/{directory.name} changed while being read")
        if isinstance(got, str):
            problem = f"periods/{directory.name}: {got}"
            break
        row, manifest = got
        expected_hash = expected_hash or manifest.get("config_hash")
        if manifest.get("config_hash") != expected_hash:
            problem = (
                f"periods/{directory.name} was committed under config hash "
                f"{str(manifest.get('config_hash'))[:8]}, the run has {str(expected_hash)[:8]}"
            )
            break
        if manifest.get("data_fingerprint") not in (None, run.fingerprint):
            problem = f"periods/{directory.name} was evaluated on other data (fingerprint differs)"
            break
        run.is_bound = run.is_bound or bool(manifest.get("is_bound"))
        run.rows.append(row)
    run.confidence_trace = _confidence_trace(path, len(run.rows) - 1)

    # Period dirs beyond the valid prefix (a gap, or names the benchmark does not have).
    known = {period_dir_name(k, n) for k, n in enumerate(names)}
    valid = {period_dir_name(r.index, r.name) for r in run.rows}
    try:
        present = sorted(e for e in os.listdir(periods_dir) if not e.startswith("."))
    except OSError:
        present = []
    stray = [e for e in present if e not in valid and (periods_dir / e).is_dir()]
    if not problem:
        unknown = [e for e in stray if e not in known]
        later = [e for e in stray if e in known]
        if unknown:
            run.warnings.append(
                f"period dirs not in the {'stream' if stream else 'benchmark'} ignored: {', '.join(unknown)}"
            )
        if later:
            missing = period_dir_name(len(run.rows), names[len(run.rows)]) if len(run.rows) < len(names) else "?"
            # A writer re-committing that dir (commit_dir) leaves it absent for the instant between its
            # two renames; if it is back a moment later, this was that instant, not a gap: read again.
            time.sleep(0.05)
            if (periods_dir / missing).is_dir():
                raise _InFlux(f"periods/{missing} was replaced while being read")
            problem = f"periods/{', '.join(later)} present but periods/{missing} is not committed"

    t_count = len(run.period_names)
    if problem:
        run.status, run.reason = "corrupted", problem
    elif len(run.rows) == t_count + 1:
        run.status = "complete"
    else:
        holder = live_holder(path)
        event = _last_event(path, run.period_names if stream else None)
        hints = [h for h in (_step_checkpoints(path), event) if h]
        if holder is not None:
            run.status = "running"
            who = f"host={holder.get('host', '?')} pid={holder.get('pid', '?')} job={holder.get('slurm_job_id')}"
            run.reason = f"{run.num_committed} of {t_count} {run.unit} committed; writer alive ({who})"
        else:
            run.status = "partial"
            run.reason = (
                f"{run.num_committed} of {t_count} {run.unit} committed"
                + ("" if run.rows else " (not even the base row)")
                + "; no live writer (killed, preempted or crashed)"
            )
        if hints:
            run.reason += "; " + "; ".join(hints)
    if run.status == "complete":
        if stream:
            run.metrics = _recompute_stream_metrics(run, stream)
        else:
            assert bench is not None  # a temporal run without its benchmark returned above
            run.metrics = _recompute_metrics(run, bench)
        _recompute_retention(run)
        _cross_check_results(run)


def find_run_dirs(root: Path, skip: Iterable[Path] = (), max_depth: int = 3) -> list[Path]:
    """Run directories under root (a dir with config.yaml or periods/); root itself may be one."""
    skip_set = {p.resolve() for p in skip}

    def is_run(d: Path) -> bool:
        return RunDir(d).config.is_file() or RunDir(d).periods.is_dir()

    if is_run(root):
        return [root]
    found: list[Path] = []
    stack = [(root, 0)]
    while stack:
        directory, depth = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue  # hidden and in-flight (.tmp-) entries; links may lead out of the run root
            sub = Path(entry.path)
            if sub.resolve() in skip_set:
                continue
            if is_run(sub):
                found.append(sub)
            elif depth + 1 < max_depth:
                stack.append((sub, depth + 1))
    return sorted(found)


def gather(root: Path, skip: Iterable[Path] = (), jobs: int = 4) -> list[Run]:
    dirs = find_run_dirs(root, skip)
    benches = _BenchmarkCache()
    if any((RunDir(d).data / STREAM_FILE).is_file() for d in dirs):
        _scorer_registry()  # the torch import, once, before the reader threads start
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # hashing releases the GIL
        return list(pool.map(lambda d: read_run(d, benches), dirs))
