"""Fan methods x seeds (x configs x benchmarks) out as ONE Slurm job array, then a report job after it.

    uv run python scripts/launch.py --methods lora,casm --seeds 0,1,2 --mode synthetic [--dry-run]
    uv run python scripts/launch.py --methods all --seeds 0-4 --executor local -- --set train.epochs=2

Each array task runs `python main.py --method M --seed S ...` in the repository; everything after
`--` is passed to every main.py. The report job (afterany on the whole array, --kill-on-invalid-dep=yes)
validates the manifests of every expected run, lists missing or partial ones, and then runs
`python -m eval_and_metrics.report RUN_ROOT` when that module exists.

Preemption (submitit's protocol): Slurm sends SIGUSR2 `--signal-delay-s` before the time limit (or
`scancel --signal=USR2`) to the job step. submitit's handler in the task process calls
TrainTask.checkpoint(), which makes sure main.py got the signal, waits until it has saved a step
checkpoint and exited 75, and returns a *fresh* TrainTask with the same arguments; submitit pickles
that and requeues the array task (`scontrol requeue <array>_<task>`). The restarted task runs the same
main.py command, which resumes from the run directory. Trainer state is never pickled: the run
directory is the only state, so a requeue can never resume from something stale.

Several ranks per run (`--gpus-per-run N`, `--nodes M`, or `--ranks-per-run N` on CPUs): each array task
is N Slurm tasks, one per rank, started by submitit's srun; each runs TrainTask, which tells its main.py
the rank (RANK/WORLD_SIZE/LOCAL_RANK from submitit's JobEnvironment) and where to meet (MASTER_ADDR =
the first node's NodeAddr, exported once by the job script; MASTER_PORT from the job id). USR2 reaches every rank; main.py's ranks agree
to stop at one step boundary, rank 0 saves, all exit 75. submitit's USR2 handler runs in every task, but
only global rank 0 calls checkpoint() and requeues (submitit.core.job_environment.SignalHandler), so the
job is requeued once; the other ranks' TrainTask returns when their main.py exits 75.

Executors: slurm (submit and return), local (submitit LocalExecutor: real subprocesses, same USR2 and
requeue path, waits for the end), debug (in-process, one task after another; for pdb).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/launch.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from scripts.command import BadInput, Parser, command, exit_quietly, prepare  # noqa: E402

if __name__ == "__main__":
    prepare()  # quiet libraries, stop flag: before the imports below

import submitit  # noqa: E402
from submitit.helpers import Checkpointable, DelayedSubmission  # noqa: E402

from scripts import status as run_status  # noqa: E402
from scripts.slurm_render import (SlurmResources, TaskSpec, expand_tasks, render_sbatch,  # noqa: E402
                                  report_parameters, train_array_parameters)
from training.rendezvous import rendezvous_host  # noqa: E402

EXIT_RESUME = 75  # main.py: stopped on a signal after saving a step checkpoint
# main.py killed by a stop signal itself (returncode -N): it arrived while no handler was installed
# (during imports, or after the run finished). Nothing newer than the last checkpoint existed, so a
# rerun loses nothing: treat it like 75.
KILLED_BY_STOP_SIGNAL = (-signal.SIGUSR1, -signal.SIGUSR2, -signal.SIGTERM)


@dataclass
class TrainTask(Checkpointable):
    """One array task: run main.py with fixed arguments; all state lives in the run directory."""

    argv: list[str]
    repo_dir: str
    python: str
    # How long checkpoint() waits for main.py to reach a step boundary and save; keep it below the
    # signal lead time (300 s) so the requeue happens before Slurm's SIGKILL at the time limit.
    stop_timeout_s: float = 240.0

    def __call__(self) -> dict[str, Any]:
        cmd = [self.python, "main.py", *self.argv]
        world = rank_env()
        print(f"launch.py task: {shlex.join(cmd)} (restart {os.environ.get('SLURM_RESTART_COUNT', '0')}"
              + (f", rank {world['RANK']} of {world['WORLD_SIZE']} meeting at {world['MASTER_ADDR']}:"
                 f"{world['MASTER_PORT']}" if world else "") + ")", flush=True)
        self._proc = subprocess.Popen(cmd, cwd=self.repo_dir, env={**os.environ, **world, "PYTHONUNBUFFERED": "1"})
        # A thread reaps the child so that this (main) thread, where Python runs signal handlers,
        # never sits inside Popen.wait() holding its lock when submitit's USR2 handler calls
        # checkpoint(), which must itself wait for the child.
        self._exited = threading.Event()
        threading.Thread(target=self._reap, daemon=True).start()
        while not self._exited.wait(1.0):
            pass
        rc = self._proc.returncode
        if rc == 0:
            return {"argv": self.argv, "returncode": 0}
        if world and world["RANK"] != "0" and (rc == EXIT_RESUME or rc in KILLED_BY_STOP_SIGNAL):
            # Every rank stopped at the same step; rank 0 (its checkpoint(), or Slurm on SIGTERM) decides
            # about the requeue. Not an error of this rank.
            print(f"launch.py task: rank {world['RANK']} stopped with the others (exit {rc})", flush=True)
            return {"argv": self.argv, "returncode": rc}
        if rc == EXIT_RESUME or rc in KILLED_BY_STOP_SIGNAL:
            # Without a USR2 through submitit: SIGTERM from scancel, preemption or `scontrol requeue`.
            # Slurm itself requeues (or cancels) the job; a rerun resumes from the saved checkpoint.
            raise RuntimeError(f"main.py stopped on SIGTERM (exit {rc}); rerunning the same task resumes from "
                               "its newest step checkpoint")
        raise RuntimeError(f"main.py exited with code {rc} (2 = bad input, 3 = run directory locked); "
                           "see the traceback above; not requeued")

    def _reap(self) -> None:
        self._proc.wait()
        self._exited.set()

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission | None:
        """submitit's USR2 hook: stop main.py at a step boundary, then requeue a fresh copy of this task."""
        proc = getattr(self, "_proc", None)
        if proc is not None and not self._exited.is_set():
            # On Slurm, srun already delivered USR2 to every process of the step, main.py included;
            # the LocalExecutor signals only this process. main.py only sets a flag, so twice is harmless.
            try:
                proc.send_signal(signal.SIGUSR2)
            except ProcessLookupError:
                pass
            if not self._exited.wait(self.stop_timeout_s):
                print(f"launch.py task: main.py did not stop within {self.stop_timeout_s:.0f}s; requeuing "
                      "anyway (it resumes from its newest periodic step checkpoint)", flush=True)
        rc = proc.returncode if proc is not None else None
        if rc not in (None, 0, EXIT_RESUME, *KILLED_BY_STOP_SIGNAL):
            print(f"launch.py task: main.py failed with exit code {rc}; not requeued", flush=True)
            return None  # submitit then records the task as failed instead of requeuing it
        # rc == 0 (finished just as the signal came): the rerun finds every period committed and only
        # rewrites results.json.
        return DelayedSubmission(TrainTask(list(self.argv), self.repo_dir, self.python, self.stop_timeout_s))

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle the live process or its thread state, only the command.
        return {k: v for k, v in self.__dict__.items() if k not in ("_proc", "_exited")}


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: from its id, so two jobs sharing a node do not collide (as run_job.sh)."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def rank_env() -> dict[str, str]:
    """What main.py needs to join the run's other ranks; {} when this task is the whole run."""
    try:
        env = submitit.JobEnvironment()
        num_tasks = env.num_tasks
    except Exception:  # the debug executor, or no job at all: one process
        return {}
    if num_tasks <= 1:
        return {}
    # SLURM_JOB_ID is numeric and distinct per array task; submitit's job_id reads <array>_<task>.
    # MASTER_ADDR: exported once by the job script (slurm_render.RENDEZVOUS_SETUP); else each rank asks
    # Slurm itself, by the same rule (the first node's NodeAddr).
    return {"RANK": str(env.global_rank), "WORLD_SIZE": str(num_tasks), "LOCAL_RANK": str(env.local_rank),
            "MASTER_ADDR": os.environ.get("MASTER_ADDR") or rendezvous_host(),
            "MASTER_PORT": os.environ.get("MASTER_PORT") or str(master_port(os.environ.get("SLURM_JOB_ID",
                                                                                              env.job_id)))}


@dataclass
class ReportTask:
    """Runs after the whole array (afterany): checks every expected run, then the metrics report."""

    run_root: str
    expected: list[str]  # run ids, in array task order
    repo_dir: str
    python: str
    log_dirs: list[str]

    def __call__(self) -> dict[str, Any]:
        statuses = {st.run_id: st for st in run_status.scan(Path(self.run_root), [Path(d) for d in self.log_dirs])}
        expected = [statuses[r] for r in self.expected if r in statuses]
        missing = [r for r in self.expected if r not in statuses]
        print(f"report: {len(self.expected)} expected runs under {self.run_root}", flush=True)
        print(run_status.format_table(expected, missing), flush=True)
        summary: dict[str, Any] = {
            "complete": [st.run_id for st in expected if st.state == "complete"],
            "partial": [st.run_id for st in expected if st.state != "complete"],
            "missing": missing,
        }
        for key in ("partial", "missing"):
            if summary[key]:
                print(f"report: {key}: {', '.join(summary[key])}", flush=True)
        if importlib.util.find_spec("eval_and_metrics.report") is not None:
            rc = subprocess.run([self.python, "-m", "eval_and_metrics.report", self.run_root],
                                cwd=self.repo_dir).returncode
            summary["eval_report_returncode"] = rc
            if rc != 0:
                raise RuntimeError(f"python -m eval_and_metrics.report exited with {rc}")
        else:
            print("report: eval_and_metrics.report not found; the table above is the report", flush=True)
        if summary["partial"] or summary["missing"]:
            # Fail the job so squeue/sacct users see it, after printing everything above.
            raise RuntimeError(f"{len(summary['partial'])} partial and {len(summary['missing'])} missing runs: "
                               "see the table; rerun launch.py with the same arguments to finish them")
        print(f"report: all {len(expected)} runs complete", flush=True)
        return summary


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_seeds(text: str) -> list[int]:
    """'0,1,5' or '0-3' or a mix: '0-2,7'."""
    seeds: list[int] = []
    for part in _csv(text):
        lo, sep, hi = part.partition("-")
        try:
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(part)])
        except ValueError:
            raise argparse.ArgumentTypeError(f"--seeds: '{part}' is not an integer or a range like 0-3") from None
        if sep and int(lo) > int(hi):
            raise argparse.ArgumentTypeError(f"--seeds: '{part}' is an empty range; write low-high, e.g. 1-3")
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds names no seed; e.g. 0,1,2 or 0-2")
    return seeds


def resolve_run_ids(tasks: list[TaskSpec]) -> list[str]:
    """The run id each task will write (config hash included), by main.py's own config code.

    This also validates every config before anything is queued: a typo fails here in seconds, not
    in N array tasks hours later. Raises ValueError (ConfigError/DataError) with main.py's message.
    """
    from training.cli import parse_configs  # heavy (torch); only needed once tasks are known

    ids = []
    for task in tasks:
        configs = parse_configs(task.main_args())
        if len(configs) != 1:
            raise ValueError(f"--methods entry '{task.method}' expands to {len(configs)} runs; list the methods "
                             "one by one (each array task is one run)")
        ids.append(configs[0].resolved_run_id())
    return ids


def make_parser() -> argparse.ArgumentParser:
    p = Parser(prog="launch.py", description=__doc__.split("\n\n")[0],
                                epilog="arguments after -- are passed to every main.py")
    p.add_argument("--methods", required=True, help="comma separated method names (each one array task per seed)")
    p.add_argument("--seeds", default="0", type=parse_seeds, help="comma separated and/or ranges: 0,1,2 or 0-2")
    p.add_argument("--configs", default="", help="comma separated config files (default: main.py's)")
    p.add_argument("--benchmarks", default="", help="comma separated benchmarks (default: the config's)")
    p.add_argument("--mode", default="real", choices=["real", "synthetic"])
    p.add_argument("--run-root", default="runs", help="where run directories go (default runs/)")
    p.add_argument("--executor", default="slurm", choices=["slurm", "local", "debug"])
    p.add_argument("--folder", default="logs/submitit/%j",
                   help="submitit folder: job scripts, pickles and logs (default logs/submitit/%%j)")
    p.add_argument("--dry-run", action="store_true", help="print the tasks and the sbatch scripts; submit nothing")
    g = p.add_argument_group("resources (per array task)")
    g.add_argument("--job-name", default="clkit")
    g.add_argument("--gpus-per-run", "--gpus", dest="gpus", type=int, default=1,
                   help="GPUs per run, one rank each (0 on CPU-only partitions); with --nodes M, M x (N/M)")
    g.add_argument("--nodes", type=int, default=1, help="nodes per run; the ranks are split evenly over them")
    g.add_argument("--ranks-per-run", type=int, default=None,
                   help="ranks per run without GPUs (CPU ranks, gloo); with GPUs it is --gpus-per-run")
    g.add_argument("--cpus", type=int, default=8, help="CPUs per rank (per Slurm task)")
    g.add_argument("--mem-gb", type=int, default=64, help="memory per node in GB")
    g.add_argument("--time-min", type=int, default=24 * 60, help="time limit per attempt in minutes")
    g.add_argument("--parallelism", type=int, default=4, help="array tasks running at once (%%P of --array)")
    g.add_argument("--signal-delay-s", type=int, default=300, help="SIGUSR2 this many seconds before the limit")
    g.add_argument("--max-timeouts", type=int, default=20,
                   help="requeues after hitting the time limit before submitit gives up (preemptions do not count)")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="any other sbatch long option, e.g. constraint=a100 (repeatable)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run in the job before the task, e.g. 'module load cuda/12.1' (repeatable)")
    return p


def build(args: argparse.Namespace, extra_args: list[str]) -> tuple[list[TaskSpec], SlurmResources]:
    run_root = str(Path(args.run_root).resolve())
    configs: list[str | None] = [str(Path(c).resolve()) for c in _csv(args.configs)] or [None]
    benchmarks: list[str | None] = list(_csv(args.benchmarks)) or [None]
    methods = _csv(args.methods)
    if not methods:
        raise ValueError("--methods: give at least one method name")
    # The runs of one launch are one group in the trackers, in one tracking directory (methods x seeds in one
    # view: docs/tracking.md); both are runtime keys, so they change no run id, and arguments after -- win.
    grouped = ("--set", f"track.group={args.job_name}", "--set", f"track.dir={run_root}/tracking")
    tasks = expand_tasks(methods, args.seeds, configs, benchmarks, args.mode, run_root, grouped + tuple(extra_args))
    extra = []
    for item in args.slurm_arg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--slurm-arg '{item}': expected KEY=VALUE, e.g. constraint=a100")
        extra.append((key.lstrip("-"), value))
    if args.parallelism < 1:
        raise ValueError(f"--parallelism must be >= 1 (got {args.parallelism})")
    nodes, tasks_per_node, gpus_per_node = rank_layout(args.gpus, args.nodes, args.ranks_per_run)
    if nodes * tasks_per_node > 1 and args.executor != "slurm":
        raise ValueError(f"{nodes * tasks_per_node} ranks per run need --executor slurm; without Slurm start one "
                         "run with torchrun --nproc-per-node N main.py ...")
    res = SlurmResources(job_name=args.job_name, time_min=args.time_min, cpus_per_task=args.cpus,
                         mem_gb=args.mem_gb, gpus_per_node=gpus_per_node, nodes=nodes,
                         tasks_per_node=tasks_per_node, partition=args.partition,
                         account=args.account, qos=args.qos, signal_delay_s=args.signal_delay_s,
                         array_parallelism=min(args.parallelism, len(tasks)), extra=tuple(extra),
                         setup=tuple(args.setup), pythonpath=str(REPO_ROOT), python=sys.executable)
    return tasks, res


def rank_layout(gpus_per_run: int, nodes: int, ranks_per_run: int | None) -> tuple[int, int, int]:
    """(nodes, tasks per node, GPUs per node) of one run: one rank per GPU, or ranks_per_run CPU ranks."""
    if gpus_per_run < 0 or nodes < 1 or (ranks_per_run is not None and ranks_per_run < 1):
        raise ValueError("--gpus-per-run must be >= 0, --nodes and --ranks-per-run >= 1")
    if gpus_per_run and ranks_per_run not in (None, gpus_per_run):
        raise ValueError(f"--ranks-per-run {ranks_per_run} with --gpus-per-run {gpus_per_run}: with GPUs there is "
                         "one rank per GPU; drop --ranks-per-run")
    ranks = gpus_per_run or ranks_per_run or 1
    if ranks % nodes:
        raise ValueError(f"{ranks} ranks do not split evenly over --nodes {nodes}; use a multiple of {nodes}")
    return nodes, ranks // nodes, gpus_per_run // nodes


def log_dirs_for(folder: Path) -> list[str]:
    # The submitit folder usually ends in a %j level; logs live below its parent.
    base = folder.parent if "%" in folder.name else folder
    return [str(base), str(REPO_ROOT / "logs")]


def _launch_slurm(tasks: list[TaskSpec], run_ids: list[str], res: SlurmResources, folder: Path,
                  args: argparse.Namespace) -> int:
    python = sys.executable
    train = [TrainTask(t.main_args(), str(REPO_ROOT), python) for t in tasks]
    ex = submitit.SlurmExecutor(folder=folder, python=shlex.quote(python), max_num_timeout=args.max_timeouts)
    ex.update_parameters(**train_array_parameters(res))
    with ex.batch():
        jobs = [ex.submit(t) for t in train]
    array_id = jobs[0].job_id.split("_")[0]
    report_ex = submitit.SlurmExecutor(folder=folder, python=shlex.quote(python))
    report_ex.update_parameters(**report_parameters(res, array_id))
    report_job = report_ex.submit(ReportTask(tasks[0].run_root, run_ids, str(REPO_ROOT), python,
                                             log_dirs_for(folder)))
    record = {"array_job_id": array_id, "report_job_id": report_job.job_id, "run_root": tasks[0].run_root,
              "tasks": [{"job_id": j.job_id, "run_id": r, "argv": t.main_args()}
                        for j, r, t in zip(jobs, run_ids, tasks)]}
    base = Path(log_dirs_for(folder)[0])
    base.mkdir(parents=True, exist_ok=True)
    (base / f"launch-{array_id}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"\nsubmitted array {array_id} ({len(jobs)} tasks, {res.array_parallelism} at a time) and report job "
          f"{report_job.job_id}\n  watch:  squeue -j {array_id},{report_job.job_id}\n"
          f"  status: uv run python scripts/status.py {tasks[0].run_root} --logs {base}\n"
          f"  report log: {report_job.paths.stdout}")
    return 0


def _launch_local(tasks: list[TaskSpec], run_ids: list[str], res: SlurmResources, folder: Path,
                  args: argparse.Namespace) -> int:
    python = sys.executable
    train = [TrainTask(t.main_args(), str(REPO_ROOT), python) for t in tasks]
    report = ReportTask(tasks[0].run_root, run_ids, str(REPO_ROOT), python, log_dirs_for(folder))
    if args.executor == "debug":
        ex: submitit.Executor = submitit.DebugExecutor(folder=folder)
    else:
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=args.max_timeouts)
        ex.update_parameters(timeout_min=res.time_min, signal_delay_s=res.signal_delay_s, stderr_to_stdout=True)
    # LocalExecutor starts everything at once; throttle like the array's %P would.
    pending, running, failures = list(zip(train, run_ids)), [], 0
    while pending or running:
        while pending and len(running) < res.array_parallelism:
            task, run_id = pending.pop(0)
            running.append((ex.submit(task), run_id))
            if args.executor == "debug":
                break  # debug jobs only run when asked for their result, one at a time
        job, run_id = next(((j, r) for j, r in running if args.executor == "debug" or j.done()), (None, None))
        if job is None:
            time.sleep(1.0)
            continue
        running.remove((job, run_id))
        try:
            job.result()
            print(f"launch.py: {run_id} done")
        except Exception as exc:  # a failed run must not stop the others; the report lists it
            failures += 1
            print(f"launch.py: {run_id} failed: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
    report_job = ex.submit(report)
    try:
        report_job.result()
    except Exception as exc:
        print(f"launch.py: report: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    finally:
        log = Path(report_job.paths.stdout)
        if log.exists():
            print(log.read_text())
    return 1 if failures else 0


@command("launch")
def main(argv: list[str]) -> int:
    argv = list(argv)
    extra_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra_args = argv[:cut], argv[cut + 1:]
    args = make_parser().parse_args(argv)
    try:
        tasks, res = build(args, extra_args)
        run_ids = resolve_run_ids(tasks)
    except ValueError as exc:  # ConfigError and DataError hold one one-line message per problem
        for line in getattr(exc, "problems", None) or [str(exc)]:
            print(f"error: {line}", file=sys.stderr)
        return 2
    folder = Path(args.folder).absolute()
    if args.dry_run:
        print(f"# {len(tasks)} array tasks, {res.array_parallelism} at a time")
        for i, (t, r) in enumerate(zip(tasks, run_ids)):
            print(f"# task {i}: main.py {shlex.join(t.main_args())}  ->  {r}")
        if args.executor == "slurm":
            python = shlex.quote(sys.executable)
            print("\n# ---- training array ----")
            print(render_sbatch(train_array_parameters(res), python=python, folder=str(folder),
                                map_count=len(tasks) if len(tasks) > 1 else None))
            print("# ---- report job ----")
            print(render_sbatch(report_parameters(res, "<ARRAY_JOB_ID>"), python=python, folder=str(folder)))
        return 0
    # Slurm cannot open --output in a directory that does not exist; submitit creates its folder,
    # main.py its run root, but a missing logs/ would silently lose a run_job.sh log later.
    if args.executor == "slurm" and shutil.which("sbatch") is None:
        raise BadInput("--executor slurm: Slurm's sbatch is not on PATH (not a Slurm login node?); use --executor "
                       "local to run here, or --dry-run to see the job scripts")
    (REPO_ROOT / "logs").mkdir(exist_ok=True)
    if args.executor == "slurm":
        return _launch_slurm(tasks, run_ids, res, folder, args)
    return _launch_local(tasks, run_ids, res, folder, args)


if __name__ == "__main__":
    # Import ourselves as scripts.launch so pickled tasks refer to scripts.launch.TrainTask (importable
    # in the job through PYTHONPATH) rather than to a __main__ that only exists in this process.
    from scripts.launch import main as _main

    exit_quietly(_main())  # a stop signal during teardown must not kill a finished process
