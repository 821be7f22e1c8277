"""Pure functions from launch options to submitit parameters and to the exact sbatch text.

scripts/launch.py submits through submitit's SlurmExecutor; `launch.py --dry-run` prints what
`render_sbatch` returns for the same parameters. The text comes from submitit's own renderer
(`submitit.slurm.slurm._make_sbatch_string`, the function SlurmExecutor calls), so the dry run cannot
drift from what is submitted, and tests/test_slurm_render.py pins it with golden files: an upgrade of
submitit that changes the job script shows up as a diff there.

Nothing here touches the file system, the environment or Slurm.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from submitit.slurm.slurm import _make_sbatch_string

# The report job only reads manifests and writes a table; it never needs a GPU or much memory.
REPORT_CPUS = 1
REPORT_MEM_GB = 4
REPORT_TIME_MIN = 60


@dataclass(frozen=True)
class SlurmResources:
    """What each training task of the array asks Slurm for (one task = one method x seed x config)."""

    job_name: str = "clkit"
    time_min: int = 24 * 60  # per attempt; a requeued task gets the full time again
    cpus_per_task: int = 8
    mem_gb: int = 64
    gpus_per_node: int = 1  # 0 on CPU-only clusters (and the local test cluster)
    # One run may span several ranks, one Slurm task each (docs/slurm.md): nodes x tasks_per_node of
    # them, one per GPU on GPU nodes. cpus_per_task is then per rank; mem_gb is per node.
    nodes: int = 1
    tasks_per_node: int = 1
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    # Same lead time as run_job.sh: SIGUSR2 this many seconds before the limit, enough for one
    # optimizer step plus a step checkpoint (Slurm may send it up to a minute early or late).
    signal_delay_s: int = 300
    array_parallelism: int = 4  # array tasks running at once (sbatch --array=0-N%P)
    extra: tuple[tuple[str, str], ...] = ()  # any further sbatch long options, e.g. (("constraint", "a100"),)
    setup: tuple[str, ...] = ()  # shell lines run before the task starts, e.g. "module load cuda/12.1"
    pythonpath: str = ""  # the repository: lets the job unpickle scripts.launch tasks by reference
    python: str = "python3"  # the job's python (launch.py: its own); runs training.rendezvous in the job script
    requeue: bool = True

    def with_updates(self, **kwargs: Any) -> "SlurmResources":
        return SlurmResources(**{**self.__dict__, **kwargs})


def _common(res: SlurmResources) -> dict[str, Any]:
    params: dict[str, Any] = {
        "stderr_to_stdout": True,  # one log per task: the traceback sits right after the progress lines
        "signal_delay_s": res.signal_delay_s,
    }
    for key in ("partition", "account", "qos"):
        value = getattr(res, key)
        if value:
            params[key] = value
    setup = list(res.setup)
    if res.pythonpath:
        setup.insert(0, f"export PYTHONPATH={shlex.quote(res.pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}}")
    if setup:
        params["setup"] = setup
    return params


def rendezvous_setup(python: str) -> str:
    """The job script line that finds where the ranks of a run meet: once per job, before srun starts the
    ranks (which inherit it), by the rule run_job.sh uses too (training/rendezvous.py: the first node's
    NodeAddr). A MASTER_ADDR the user exported wins."""
    return f'export MASTER_ADDR="${{MASTER_ADDR:-$({shlex.quote(python)} -m training.rendezvous)}}"'


def train_array_parameters(res: SlurmResources) -> dict[str, Any]:
    """SlurmExecutor.update_parameters() keywords for the training array."""
    params = _common(res)
    params.update(job_name=res.job_name, time=res.time_min, cpus_per_task=res.cpus_per_task,
                  mem=f"{res.mem_gb}GB", array_parallelism=res.array_parallelism)
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    if res.nodes > 1:
        params["nodes"] = res.nodes
    if res.tasks_per_node > 1:
        # submitit's srun then starts one task per rank; every rank sees all GPUs of its node (no
        # --gpus-per-task, which would renumber them) and picks cuda:LOCAL_RANK.
        params["ntasks_per_node"] = res.tasks_per_node
    if res.nodes * res.tasks_per_node > 1:
        # after PYTHONPATH (the module lives in the repository) and the user's setup (module loads)
        params["setup"] = [*params.get("setup", []), rendezvous_setup(res.python)]
    # Slurm 22.05's srun no longer inherits --cpus-per-task from sbatch; without this the task's step
    # (which is where python runs) would get a single CPU on clusters that bind tasks to cores.
    params["srun_args"] = [f"--cpus-per-task={res.cpus_per_task}"]
    additional: dict[str, Any] = {}
    if res.requeue:
        additional["requeue"] = True  # submitit requeues on USR2 with `scontrol requeue`, which needs it
    additional.update(dict(res.extra))
    if additional:
        params["additional_parameters"] = additional
    return params


def report_parameters(res: SlurmResources, after_job_id: str) -> dict[str, Any]:
    """SlurmExecutor.update_parameters() keywords for the report job that runs after the array.

    afterany, not afterok: a member that failed (or was preempted and failed later) must not block
    the report forever; the report checks the manifests itself and lists what is missing.
    --kill-on-invalid-dep=yes: if the array id is unknown (purged, typo), fail instead of pending forever.
    """
    params = _common(res)
    params.update(job_name=f"{res.job_name}-report", time=REPORT_TIME_MIN, cpus_per_task=REPORT_CPUS,
                  mem=f"{REPORT_MEM_GB}GB", dependency=f"afterany:{after_job_id}",
                  srun_args=[f"--cpus-per-task={REPORT_CPUS}"])
    additional: dict[str, Any] = {"kill-on-invalid-dep": "yes"}
    additional.update({k: v for k, v in res.extra if k not in ("gres", "gpus", "constraint")})
    params["additional_parameters"] = additional
    return params


def submitit_command(python: str, folder: str) -> str:
    """The command submitit puts in the job script (SlurmExecutor._submitit_command_str)."""
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(folder)])


def render_sbatch(params: dict[str, Any], *, python: str, folder: str, map_count: int | None = None) -> str:
    """The sbatch script SlurmExecutor submits for `params`; map_count = number of array tasks."""
    return _make_sbatch_string(command=submitit_command(python, folder), folder=folder, map_count=map_count,
                               **params)


@dataclass(frozen=True)
class TaskSpec:
    """One training task: a main.py invocation (one method, one seed, one config/benchmark)."""

    method: str
    seed: int
    config: str | None = None
    benchmark: str | None = None
    mode: str = "real"
    run_root: str = "runs"
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def main_args(self) -> list[str]:
        args = ["--method", self.method, "--seed", str(self.seed), "--mode", self.mode, "--run-root", self.run_root]
        if self.config:
            args += ["--config", self.config]
        if self.benchmark:
            args += ["--benchmark", self.benchmark]
        return args + list(self.extra_args)


def expand_tasks(methods: list[str], seeds: list[int], configs: list[str | None], benchmarks: list[str | None],
                 mode: str, run_root: str, extra_args: tuple[str, ...] = ()) -> list[TaskSpec]:
    """The cross product, in a stable order (config, benchmark, method, seed) = array task order."""
    return [TaskSpec(method=m, seed=s, config=c, benchmark=b, mode=mode, run_root=run_root, extra_args=extra_args)
            for c in configs for b in benchmarks for m in methods for s in seeds]
