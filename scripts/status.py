"""Progress of every run under a run root, read from the run directories alone.

    uv run python scripts/status.py RUN_ROOT [--logs DIR ...] [--json] [--no-verify]
    uv run python main.py status RUN_ROOT            (same thing)

For each run directory: periods committed k/T, the newest step checkpoint, how often Slurm restarted
it, the job that last held it, and the last error line found in that job's log. Nothing here asks
Slurm (no sacct, no squeue): many clusters run without accounting, and a run directory must be
readable after the jobs are long gone.

Where each column comes from (all written by main.py, see docs/design.md):
- periods k/T: `periods/<k>-<name>/` whose manifest.json verifies (sha256 of every file), k >= 1;
  T = len(results.json "periods"), else the run's data/stream.json tasks or data/benchmark.json
  periods, else config.yaml data.periods (not for a stream run: those are the temporal defaults).
- task streams (`main.py --stream`, data/stream.json): the same columns, counted in tasks ("k/T tasks"),
  and under the table one line per unfinished stream run: the stream, tasks committed, the task being trained or
  evaluated now (running) or where it stopped (partial), and the last train_log.jsonl event.
- checkpoint: newest `checkpoints/<k>-<name>/step-NNNNNN/` whose manifest verifies.
- restarts: the largest `restart_count` (SLURM_RESTART_COUNT) in any manifest, run.json or
  train_log.jsonl "resume" record.
- job / running: `.lock` holder (live if its flock is held now), else run.json's slurm_job_id.
- last error: main.py writes no error file; its stderr goes to the Slurm log. With --logs DIR we look
  for the newest log file whose name contains one of the run's job ids (run_job.sh: logs/<name>-<jobid>.out,
  launch.py: logs/submitit/<jobid>_0_log.out) and report its last error line, if any.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/status.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from scripts.command import BadInput, Parser, command, exit_quietly, prepare  # noqa: E402

if __name__ == "__main__":
    prepare()  # quiet libraries, stop flag: before the imports below

from artifacts import (RunDir, UnreadableFileError, UnsafePathError, live_holder, read_holder, read_manifest,  # noqa: E402
                       read_regular_bytes, read_regular_text, verify_manifest)

_STEP_DIR = re.compile(r"^step-(\d+)$")
# Lines worth calling "the error", most telling first: main.py's one-line bad-input message and the
# last line of a Python traceback ("ValueError: ..."); then the wrappers' own lines (run_job.sh, srun,
# slurmstepd), which only say that something failed. srun's "Exited with exit code 75" is a clean stop
# for a requeue, not an error.
_ERROR_LINE = re.compile(r"^(error: .*|[A-Za-z_][\w.]*(Error|Exception|Interrupt)(: .*)?)$")
_WRAPPER_ERROR_LINE = re.compile(
    r"^(run_job\.sh: (error|main\.py failed).*|srun: error: (?!.*exit code 75$).*"
    r"|slurmstepd.*(DUE TO TIME LIMIT|oom-kill|Out Of Memory).*)$")
# The first line of each attempt in a log that Slurm appends to across requeues (--open-mode=append):
# only the newest attempt's errors are current.
_ATTEMPT_START = re.compile(r"^(run_job\.sh: job \S+ .*restart|launch\.py task: )")


@dataclass
class RunStatus:
    run_id: str
    path: str
    method: str | None = None
    seed: int | None = None
    periods_done: int = 0  # committed periods k >= 1 that verify, counted as a prefix 1..k
    periods_total: int | None = None
    base_done: bool = False  # periods/0-base (eval of the untrained model) verifies
    results: bool = False  # results.json exists
    invalid: list[str] = field(default_factory=list)  # "<dir>: <reason>" for dirs that fail verification
    last_checkpoint: str | None = None  # "<k>-<name> step N"
    restarts: int = 0
    job: str | None = None  # last Slurm job that held the run (array tasks as <array>_<task>)
    running: bool = False  # a live process holds the run lock right now
    last_error: str | None = None
    job_ids: list[str] = field(default_factory=list)
    # task streams only (to_json leaves these out for temporal runs, whose output stays as it was)
    kind: str = "temporal"
    stream: str | None = None  # the stream's name
    tasks: list[str] | None = None
    current: str | None = None  # the stage after the committed prefix: "base" or a task name
    last_event: str | None = None
    # experiment trackers (tracking.json, written by main.py with track.backends): backend -> where its record is
    tracking: dict[str, dict[str, Any]] | None = None
    unreadable: bool = False  # the run directory itself could not be read (its reason is in invalid)

    @property
    def state(self) -> str:
        if self.unreadable:
            return "unreadable"
        if self.running:
            return "running"
        if self.results and self.base_done and self.periods_total is not None \
                and self.periods_done == self.periods_total:
            return "complete"
        if self.base_done or self.periods_done or self.last_checkpoint:
            return "partial"
        return "empty"

    def to_json(self) -> dict[str, Any]:
        out = {**asdict(self), "state": self.state}
        out.pop("unreadable")
        if self.kind != "stream":
            for key in _STREAM_FIELDS:
                out.pop(key)
        if self.tracking is None:  # runs without trackers keep their output as it was
            out.pop("tracking")
        return out


_STREAM_FIELDS = ("kind", "stream", "tasks", "current", "last_event")
# A run directory is untrusted input (another user's scratch, a killed writer, a full disk): every file is
# read bounded and without blocking (a FIFO), and a file that cannot be read or parsed is one problem in the
# run's row, never an exception that hides the other runs.
MAX_LOG_BYTES = 4 << 30  # train_log.jsonl is scanned line by line for resume records up to this size


def _read_json(path: Path, problems: list[str] | None = None) -> Any:
    """The parsed file; None when absent, or unreadable/invalid (then one problem is added, if asked)."""
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return json.loads(read_regular_text(path))
    except FileNotFoundError:
        return None
    except UnreadableFileError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
    except ValueError as exc:
        reason = f"not valid JSON ({str(exc).splitlines()[0][:80]})"
    if problems is not None:
        problems.append(f"{_rel(path)}: {reason}")
    return None


def _rel(path: Path) -> str:
    """A file of a run directory by its name inside it: data/stream.json, results.json."""
    return f"{path.parent.name}/{path.name}" if path.parent.name in ("data",) else path.name


def _read_config(run_dir: Path, problems: list[str] | None = None) -> dict[str, Any]:
    """config.yaml as a mapping; {} (and a problem) when it is anything else."""
    path = RunDir(run_dir).config
    if not path.exists() and not path.is_symlink():
        return {}
    try:
        tree = yaml.safe_load(read_regular_text(path))
    except FileNotFoundError:
        return {}
    except UnreadableFileError as exc:
        tree, reason = None, str(exc).removeprefix(f"{path}: ")
    except yaml.YAMLError as exc:
        tree, reason = None, f"not valid YAML ({' '.join(str(exc).split())[:80]})"
    else:
        reason = f"not a mapping of config sections (a YAML {type(tree).__name__})"
    if isinstance(tree, dict):
        return tree
    if problems is not None:
        problems.append(f"config.yaml: {reason}")
    return {}


def _section(tree: dict[str, Any], key: str) -> dict[str, Any]:
    value = tree.get(key)
    return value if isinstance(value, dict) else {}


def _log_lines(path: Path, problems: list[str] | None = None) -> Iterator[str]:
    """train_log.jsonl line by line (bounded memory; a FIFO or a huge file is one problem, no lines)."""
    import os
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        if problems is not None:
            problems.append(f"{path.name}: cannot read ({exc.strerror})")
        return
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_LOG_BYTES:
            if problems is not None:
                problems.append(f"{path.name}: " + ("not a regular file" if not stat.S_ISREG(info.st_mode)
                                                    else f"{info.st_size} bytes, over {MAX_LOG_BYTES}"))
            return
        os.set_blocking(fd, True)
        while raw := fh.readline(1 << 20):  # a line longer than 1 MiB comes in pieces, none valid JSON
            yield raw.decode("utf-8", "replace")


def _stream_of(run_dir: Path, cfg: dict[str, Any]) -> tuple[str, list[str] | None] | None:
    """(name, task names) of a stream run, None for a temporal run. A stream run keeps data/stream.json;
    before that is written (a moment after the run starts) only its config names the stream file."""
    stream = _read_json(RunDir(run_dir).data / "stream.json")
    if isinstance(stream, dict) and isinstance(stream.get("tasks"), list):
        names = [str(t.get("name")) for t in stream["tasks"] if isinstance(t, dict)]
        return str(stream.get("name", "?")), names
    path = _section(cfg, "data").get("stream")
    return (Path(str(path)).stem, None) if path else None


def _period_names(run_dir: Path, results: Any = None, cfg: dict[str, Any] | None = None,
                  problems: list[str] | None = None) -> list[str] | None:
    if isinstance(results, dict) and isinstance(results.get("periods"), list):
        return [str(p) for p in results["periods"]]
    stream = _read_json(RunDir(run_dir).data / "stream.json", problems)
    if isinstance(stream, dict) and isinstance(stream.get("tasks"), list):
        return [str(t.get("name")) for t in stream["tasks"] if isinstance(t, dict)]
    bench = _read_json(RunDir(run_dir).data / "benchmark.json", problems)
    if isinstance(bench, dict) and isinstance(bench.get("periods"), list):
        return [str(p.get("name")) for p in bench["periods"] if isinstance(p, dict)]
    cfg = _read_config(run_dir) if cfg is None else cfg
    if _section(cfg, "data").get("stream"):
        return None  # its data.periods are the temporal defaults, not the stream's tasks
    periods = _section(cfg, "data").get("periods")
    return [str(p) for p in periods] if isinstance(periods, list) else None


def last_event(run_dir: Path, stage_names: list[str] | None) -> str | None:
    """The newest train_log.jsonl record in words (reads the last 4 KiB): "train task 2 (code) step 7",
    "eval task 0 (base)", "resume task 3 (style) from step 12"."""
    rec = RunDir(run_dir).last_record()
    if rec is None:
        return None
    k = rec.get("period")
    names = ["base"] + (stage_names or [])
    where = f"task {k}" + (f" ({names[k]})" if isinstance(k, int) and 0 <= k < len(names) else "")
    text = f"{rec.get('event', '?')} {where}"
    if "step" in rec:
        text += f" step {rec['step']}"
    elif "from_step" in rec:
        text += f" from step {rec['from_step']}"
    return text


def _numbered_dirs(parent: Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    if not parent.is_dir():
        return []
    out = []
    for child in parent.iterdir():
        m = pattern.match(child.name)
        if m and child.is_dir() and not child.is_symlink():  # a link leads out of the run: not its period
            out.append((int(m.group(1)), child))
    return sorted(out)


def _check(directory: Path, verify: bool) -> tuple[bool, str]:
    if verify:
        return verify_manifest(directory)
    return (read_manifest(directory) is not None, "no readable manifest.json")


def _restart_counts(run_dir: Path, manifests: list[dict[str, Any]],
                    problems: list[str] | None = None) -> tuple[int, list[str]]:
    """Largest restart_count and every Slurm job id the run has recorded, oldest first."""
    counts, jobs = [0], []
    records: list[dict[str, Any]] = list(manifests)
    run = RunDir(run_dir)
    run_json = _read_json(run.run_meta, problems)
    if isinstance(run_json, dict):
        records.append(run_json)
    for line in _log_lines(run.train_log, problems):
        if '"resume"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line; the trainer drops it on resume too
        if isinstance(rec, dict):  # a line that is JSON but not an object is no record
            records.append(rec)
    for rec in records:
        rc = rec.get("restart_count")
        if isinstance(rc, int):
            counts.append(rc)
        job = rec.get("slurm_job_id")
        if job and str(job) not in jobs:
            jobs.append(str(job))
    return max(counts), jobs


def last_error_in(log_file: Path) -> str | None:
    """The last line of the newest attempt in a job log that reads as an error, or None."""
    try:
        text = read_regular_bytes(log_file, MAX_LOG_BYTES).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    found, wrapper = None, None
    for line in text.splitlines():
        line = line.strip()
        if _ATTEMPT_START.match(line):
            found, wrapper = None, None
        elif _ERROR_LINE.match(line):
            found = line
        elif _WRAPPER_ERROR_LINE.match(line):
            wrapper = line
    return found or wrapper


def find_job_logs(log_dirs: list[Path], job_ids: list[str]) -> list[Path]:
    """Log files of these jobs, newest first.

    Names we know: run_job.sh `<name>-<jobid>.out` (or `<name>-<array>_<task>.out` with
    --output=logs/%x-%A_%a.out) and submitit `<jobid>_<rank>_log.out`, where an array task's jobid is
    `<array>_<task>`. Anchored on both sides, so job 4 never matches 14 or 14_4.
    """
    if not job_ids:
        return []
    ids = "|".join(re.escape(j) for j in job_ids)
    pattern = re.compile(rf"(^|[-.])({ids})(\.(out|err|log)|_\d+_log\.(out|err))$")
    hits = []
    for d in log_dirs:
        if not d.is_dir():
            continue
        for f in d.rglob("*"):
            if pattern.search(f.name) and f.is_file():
                hits.append(f)
    return sorted(hits, key=lambda f: f.stat().st_mtime, reverse=True)


def run_status(run_dir: Path, log_dirs: list[Path] | None = None, verify: bool = True) -> RunStatus:
    run_dir = Path(run_dir)
    st = RunStatus(run_id=run_dir.name, path=str(run_dir))
    cfg = _read_config(run_dir, st.invalid)
    method = cfg.get("method")
    if "method" in cfg and not isinstance(method, dict):
        st.invalid.append(f"config.yaml: method is a {type(method).__name__}, not a section")
    name = _section(cfg, "method").get("name")
    st.method = name if isinstance(name, str) else None
    seed = cfg.get("seed")
    st.seed = seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    run = RunDir(run_dir)
    results = _read_json(run.results, st.invalid)
    if results is not None and not (isinstance(results, dict) and isinstance(results.get("periods"), list)):
        st.invalid.append("results.json: not a results object with a list of periods")
    names = _period_names(run_dir, results, cfg, st.invalid)
    stream = _stream_of(run_dir, cfg)
    if stream is not None:
        st.kind, st.stream, st.tasks = "stream", stream[0], names
    st.periods_total = len(names) if names is not None else None
    st.results = isinstance(results, dict) and isinstance(results.get("periods"), list)

    manifests: list[dict[str, Any]] = []
    done_prefix, gap = 0, False
    for k, pdir in run.period_entries():
        ok, reason = _check(pdir, verify)
        if not ok:
            st.invalid.append(f"{pdir.name}: {reason}")
            gap = gap or k >= 1
            continue
        manifests.append(read_manifest(pdir) or {})
        if k == 0:
            st.base_done = True
        elif not gap and k == done_prefix + 1:
            done_prefix = k
        else:
            gap = True
    st.periods_done = done_prefix

    newest: tuple[int, int, Path] | None = None  # (period, step, dir)
    for k, croot in run.checkpoint_entries():
        for step, sdir in reversed(_numbered_dirs(croot, _STEP_DIR)):
            ok, _ = _check(sdir, verify)
            if ok:
                manifests.append(read_manifest(sdir) or {})
                if newest is None or (k, step) > newest[:2]:
                    newest = (k, step, sdir)
                break
    if newest is not None:
        st.last_checkpoint = f"{newest[2].parent.name} step {newest[1]}"

    st.restarts, st.job_ids = _restart_counts(run_dir, manifests, st.invalid)
    holder = live_holder(run_dir)
    st.running = holder is not None
    if holder is None:
        holder = read_holder(run_dir)
    if holder and holder.get("slurm_job_id"):
        st.job = str(holder["slurm_job_id"])
        if st.job not in st.job_ids:
            st.job_ids.append(st.job)
    elif st.job_ids:
        st.job = st.job_ids[-1]
    if log_dirs:
        logs = find_job_logs(log_dirs, st.job_ids)
        # Only the newest log: an error from an attempt that a later restart got past is history.
        st.last_error = last_error_in(logs[0]) if logs else None
    record = _read_json(run.tracking)
    if isinstance(record, dict) and isinstance(record.get("backends"), dict):
        st.tracking = record["backends"]
    if st.kind == "stream" and st.state != "complete":
        if not st.base_done:
            st.current = "base"
        elif names is not None and st.periods_done < len(names):
            st.current = names[st.periods_done]
        st.last_event = last_event(run_dir, names)
    return st


def is_run_dir(path: Path) -> bool:
    run = RunDir(path)
    return path.is_dir() and not path.name.startswith(".") and (
        run.config.exists() or run.periods.is_dir() or run.run_meta.exists())


def scan(run_root: Path, log_dirs: list[Path] | None = None, verify: bool = True) -> list[RunStatus]:
    run_root = Path(run_root)
    if not run_root.is_dir():
        return []
    return [_status_or_unreadable(p, log_dirs, verify) for p in sorted(run_root.iterdir()) if is_run_dir(p)]


def _status_or_unreadable(run_dir: Path, log_dirs: list[Path] | None, verify: bool) -> RunStatus:
    """run_status, or, for a run directory that cannot be read at all (permissions, a link, an I/O error), a
    row that says so: one bad run never hides the others."""
    try:
        return run_status(run_dir, log_dirs, verify)
    except (OSError, UnreadableFileError, UnsafePathError) as exc:
        return RunStatus(run_id=run_dir.name, path=str(run_dir), unreadable=True,
                         invalid=[" ".join(f"unreadable: {exc}".splitlines())])


def format_table(statuses: list[RunStatus], missing: list[str] = ()) -> str:
    header = ["RUN", "STATE", "PERIODS", "CHECKPOINT", "RESTARTS", "JOB", "LAST ERROR"]
    rows = []
    for st in statuses:
        total = "?" if st.periods_total is None else str(st.periods_total)
        error = st.last_error or ("; ".join(st.invalid) if st.invalid else "-")
        unit = " tasks" if st.kind == "stream" else ""
        rows.append([st.run_id, st.state, f"{st.periods_done}/{total}{unit}", st.last_checkpoint or "-",
                     str(st.restarts), st.job or "-", error])
    rows.extend([run_id, "missing", "-", "-", "-", "-", "no run directory"] for run_id in missing)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    # a line per unfinished stream run (the table's "k/T tasks" says enough of a finished one); output
    # without stream runs is unchanged
    streams = [st for st in statuses if st.kind == "stream" and st.state != "complete"]
    if streams:
        lines += ["", "task streams:"]
        lines += [f"  {st.run_id}: {describe_stream(st)}" for st in streams]
    tracked = [st for st in statuses if st.tracking is not None]
    if tracked:
        lines += ["", "trackers (tracking.json; docs/tracking.md):"]
        lines += [f"  {st.run_id}: {describe_tracking(st.tracking or {})}" for st in tracked]
    return "\n".join(lines)


def describe_tracking(backends: dict[str, dict[str, Any]]) -> str:
    """Where each tracker's record of a run is, e.g. 'tensorboard runs/x/tracking/tensorboard/x; mlflow run
    3f2e.. in file:///..; wandb id x-1a2b (offline, runs/x/tracking/wandb-runs)'."""
    if not backends:
        return "no tracker could be opened (see the run's log)"
    parts = []
    for name, rec in sorted(backends.items()):
        if name == "tensorboard":
            parts.append(f"tensorboard {rec.get('log_dir')}")
        elif name == "mlflow":
            parts.append(f"mlflow run {rec.get('run_id')} in {rec.get('tracking_uri')}")
        elif name == "wandb":
            parts.append(f"wandb id {rec.get('id')} ({rec.get('mode')}, {rec.get('dir')})")
        else:
            parts.append(name)
    return "; ".join(parts)


def describe_stream(st: RunStatus) -> str:
    """A stream run's progress in one line, e.g. 'stream x: 1 of 3 tasks committed (mc); training/evaluating
    style (task 2 of 3); last event: train task 2 (style) step 3'."""
    total = "?" if st.periods_total is None else str(st.periods_total)
    done = (st.tasks or [])[:st.periods_done]
    text = f"stream {st.stream}: {st.periods_done} of {total} tasks committed"
    text += f" ({', '.join(done)})" if done else ""
    if st.state == "complete":
        return text + "; complete"
    if st.current == "base":
        text += "; " + ("evaluating the base model" if st.running else "stopped before the base model was evaluated")
    elif st.current is not None:
        where = f"{st.current} (task {st.periods_done + 1} of {total})"
        text += f"; {'training/evaluating' if st.running else 'stopped in'} {where}"
    if st.last_event:
        text += f"; last event: {st.last_event}"
    return text


def make_parser() -> argparse.ArgumentParser:
    p = Parser(prog="status", description=__doc__.split("\n\n")[0])
    p.add_argument("run_root", nargs="?", default="runs", help="directory holding run directories (default runs/)")
    p.add_argument("--logs", action="append", type=Path, default=None, metavar="DIR",
                   help="where Slurm logs are (searched recursively; repeatable); default: ./logs if it exists")
    p.add_argument("--expect", action="append", default=[], metavar="RUN_ID",
                   help="a run id that should exist; listed as missing when it does not (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    p.add_argument("--no-verify", action="store_true",
                   help="trust manifest.json without re-hashing the files (fast on multi-GB runs)")
    p.add_argument("--fail-incomplete", action="store_true",
                   help="exit 1 unless every run (and every --expect run) is complete")
    return p


@command("status")
def main(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    run_root = Path(args.run_root)
    if not run_root.is_dir():
        raise BadInput(f"run root {run_root} does not exist or is not a directory")
    log_dirs = args.logs if args.logs is not None else ([Path("logs")] if Path("logs").is_dir() else [])
    statuses = scan(run_root, log_dirs, verify=not args.no_verify)
    present = {st.run_id for st in statuses}
    missing = [r for r in args.expect if r not in present]
    if args.expect:  # with an explicit list, report exactly those runs
        statuses = [st for st in statuses if st.run_id in set(args.expect)]
    if args.json:
        for st in statuses:
            print(json.dumps(st.to_json(), sort_keys=True))
        for run_id in missing:
            print(json.dumps({"run_id": run_id, "state": "missing"}, sort_keys=True))
    else:
        if not statuses and not missing:
            print(f"no run directories under {run_root}")
        else:
            print(format_table(statuses, missing))
    incomplete = missing or any(st.state != "complete" for st in statuses)
    return 1 if args.fail_incomplete and incomplete else 0


if __name__ == "__main__":
    exit_quietly(main())  # a stop signal during teardown must not kill a finished process
