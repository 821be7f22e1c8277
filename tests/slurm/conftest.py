"""The `slurm` session fixture: a real single-node Slurm cluster (scripts/local_slurm.sh) for the tests;
`slurm_two_nodes`: a second cluster of two nodes, n1 and n2 (one slurmd each, NodeAddr 127.0.0.2/3).

Locally the Slurm tests skip, with the reason, when slurmctld is not installed or we are not root;
with CI=true a missing Slurm is a failure: CI must run them (.ci/run installs slurm-wlm and munge).
The cluster gets its own state dir and free ports, so it never collides with one started by hand.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "scripts" / "local_slurm.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (the slurmds of a multi-node cluster: port, port + 1, ...)."""
    for _ in range(100):
        first = _free_port()
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", first))
                for port in range(first + 1, first + count):
                    b.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


@dataclass
class SlurmCluster:
    """Handle on the running test cluster: the environment to talk to it and small polling helpers."""

    state_dir: Path
    env: dict[str, str]  # os.environ + SLURM_CONF: pass to every subprocess that calls Slurm

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def signal(self, job_id: str, sig: str) -> None:
        """`scancel --signal=SIG job_id`; the caller checks the effect (e.g. that the job was requeued).

        Slurm 22.05 can deliver a signal to a running array task and still answer "Job can not be
        altered now, try again later" (seen while tasks of the same array were pending); scancel then
        retries after 5 s, 6 s, 7 s... and a retry hits the task again after its restart, or another
        task. So: the first attempt only (it takes milliseconds); stop scancel before its first retry.
        """
        try:
            subprocess.run(["scancel", f"--signal={sig}", job_id], env=self.env, capture_output=True, timeout=3)
        except subprocess.TimeoutExpired:
            pass

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        return self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job -o` as dicts (one per array task); [] once Slurm forgot the job."""
        proc = self.run("scontrol", "show", "job", "-o", job_id, check=False)
        if proc.returncode != 0:
            return []
        return [dict(re.findall(r"(\w[\w:/]*)=(\S*)", line)) for line in proc.stdout.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        found = self.jobs(job_id)
        assert len(found) == 1, f"expected one job for {job_id}, got {len(found)}"
        return found[0]

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout_s: float = 300, poll_s: float = 1.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(poll_s)
        raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.run('squeue').stdout}")

    def wait_done(self, job_id: str, timeout_s: float = 300) -> dict[str, str]:
        """Wait until the job (every task of an array) left the queue for good; return its last record."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                 "BOOT_FAIL", "DEADLINE"}
        self.wait_for(f"job {job_id} to finish",
                      lambda: all(j.get("JobState") in final for j in self.jobs(job_id) or [{}]), timeout_s)
        return self.jobs(job_id)[-1]

    def kill_node(self, node: str) -> None:
        """The node dies: its slurmd, its step daemons and the job processes on it, SIGKILLed at once."""
        self.run("bash", str(LOCAL_SLURM), "kill-node", node)

    def start_node(self, node: str) -> None:
        """The node is back: its slurmd starts and registers; slurmctld returns it to service (ReturnToService=2)."""
        self.run("bash", str(LOCAL_SLURM), "start-node", node)
        self.wait_for(f"node {node} idle", lambda: "idle" in self.run("sinfo", "-h", "-N", "-n", node, "-o", "%T").stdout,
                      timeout_s=60)

    def release_when_requeued(self, job_id: str, timeout_s: float = 120) -> dict[str, str]:
        """A requeued job waits ~2 minutes (BeginTime) before it may start again; start it now."""
        self.wait_for(f"job {job_id} to be requeued",
                      lambda: (lambda j: j.get("JobState") == "PENDING" and int(j.get("Restarts", "0")) >= 1)(
                          self.job(job_id)), timeout_s, poll_s=0.5)
        # That wait exists because the requeue revokes the job's credential on the node (slurm.conf
        # AuthInfo cred_expire: "also controls how long a requeued job must wait before starting
        # again"), and slurmd refuses a launch whose credential was not issued after the revocation
        # (both are whole-second timestamps). The full suite once saw a restart that we released at
        # once end FAILED without writing a line, most likely this. So let a few seconds pass first.
        time.sleep(3)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return self.job(job_id)


def _cluster(prefix: str, **knobs: str) -> Iterator[SlurmCluster]:
    """Start a cluster with scripts/local_slurm.sh in a fresh state dir on free ports; stop it afterwards."""
    problem = None
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        problem = "Slurm is not installed (apt-get install -y slurm-wlm munge; see docs/slurm.md)"
    elif os.geteuid() != 0:
        problem = "the local Slurm cluster needs root (slurmd launches jobs as the submitting user)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {problem}", pytrace=False)
        pytest.skip(problem)
    # Not under pytest's basetemp: munged insists that every directory above its socket is
    # world-executable, and pytest makes its temp dirs 0700. Also keeps the socket path short (< 108 bytes).
    state = Path(tempfile.mkdtemp(prefix=prefix))
    state.chmod(0o755)
    env = {**os.environ, "LOCAL_SLURM_DIR": str(state), "LOCAL_SLURM_CTLD_PORT": str(_free_port()),
           "SLURM_CONF": str(state / "slurm.conf"), **knobs}
    env.setdefault("LOCAL_SLURM_SLURMD_PORT", str(_free_port()))
    started = subprocess.run(["bash", str(LOCAL_SLURM), "start"], env=env, capture_output=True, text=True,
                             timeout=180)
    if started.returncode != 0:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], env=env, capture_output=True, timeout=120)
        pytest.fail(f"local_slurm.sh start failed:\n{started.stdout}\n{started.stderr}", pytrace=False)
    try:
        yield SlurmCluster(state_dir=state, env=env)
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop"], env=env, capture_output=True, timeout=120)
        if os.environ.get("CLKIT_KEEP_SLURM_STATE") != "1":  # set it to read the daemons' logs afterwards
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm() -> Iterator[SlurmCluster]:
    yield from _cluster("clkit-slurm-")


@pytest.fixture(scope="session")
def slurm_two_nodes() -> Iterator[SlurmCluster]:
    """Two nodes on this machine: n1 at 127.0.0.2 and n2 at 127.0.0.3 (names that are not host names).

    SlurmdTimeout 6 s: a killed node is declared DOWN (and its job requeued) within about 20 s instead of
    5 minutes. Job ids from a random start: the ranks' port is 20000 + job id mod 20000, and clusters of
    other test sessions on this machine count from 1."""
    yield from _cluster("clkit-slurm2-", LOCAL_SLURM_NODES="2", LOCAL_SLURM_SLURMD_PORT=str(_free_ports(2)),
                        LOCAL_SLURM_SLURMD_TIMEOUT="6", LOCAL_SLURM_FIRST_JOB_ID=str(random.randrange(1000, 19000)))
