"""Where the ranks of a Slurm job meet (training/rendezvous.py) and how long they may try (init_world).

Measured before (issue 24): with node names n1, n2 that are not host names (NodeAddr 127.0.0.2/3), the
rendezvous was `n1` from the host list, and every rank retried resolving it in silence until cancelled.
Now the host is the first node's NodeAddr, and a host that does not resolve or answer ends every rank
within train.rendezvous_timeout_s in one line naming host:port, exit 75. Fast: no Slurm, a fake
scontrol, timeouts of a second or two.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from training.distributed import RendezvousFailed, init_world
from training.rendezvous import expand_hostlist, first_node, rendezvous_host

# What `scontrol show node --oneliner n1` prints on the two-node test cluster (trimmed).
SHOW_NODE = ("NodeName=n1 Arch=x86_64 CoresPerSocket=1 CPUAlloc=0 CPUTot=2 NodeAddr=127.0.0.2 NodeHostName=vm "
             "Port=6921 State=IDLE Partitions=debug")


@pytest.mark.parametrize("text, hosts", [
    ("n1", ["n1"]),
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("gpu[07-08],cpu3", ["gpu07", "gpu08", "cpu3"]),
    ("gpu[09-11]", ["gpu09", "gpu10", "gpu11"]),  # the bound's width, as scontrol show hostnames
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a[1,3],b-x[2-3]", ["a1", "a3", "b-x2", "b-x3"]),
])
def test_slurm_host_lists_expand_as_scontrol_show_hostnames_does(text: str, hosts: list[str]) -> None:
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("text", ["n[1-", "n[3-1]", "n[a-b]"])
def test_a_host_list_we_cannot_read_is_an_error_not_a_guess(text: str) -> None:
    with pytest.raises(ValueError, match="Slurm host list"):
        expand_hostlist(text)


@pytest.fixture
def fake_scontrol(tmp_path: Path) -> dict[str, str]:
    """A PATH whose scontrol answers `show node n1` like the two-node cluster and fails for anything else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\n[ "$4" = n1 ] && echo "{SHOW_NODE}" && exit 0\necho "node $4 not found" >&2\n'
                      "exit 1\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_the_rendezvous_is_the_first_nodes_nodeaddr_else_its_name(fake_scontrol: dict[str, str]) -> None:
    assert rendezvous_host({**fake_scontrol, "SLURM_JOB_NODELIST": "n[1-2]"}) == "127.0.0.2"
    # inside a step, the step's first node is where rank 0 runs
    assert first_node({"SLURM_STEP_NODELIST": "n[2-3]", "SLURM_JOB_NODELIST": "n[1-3]"}) == "n2"
    # scontrol does not know the node (or is missing, or its controller is down): the name, as before
    assert rendezvous_host({**fake_scontrol, "SLURM_JOB_NODELIST": "gpu[07-08]"}) == "gpu07"
    assert rendezvous_host({"PATH": "/nonexistent", "SLURM_JOB_NODELIST": "n[1-2]"}) == "n1"
    assert rendezvous_host({"PATH": "/nonexistent"}) == socket.gethostname().split(".")[0]  # no Slurm


def test_run_job_sh_exports_the_nodeaddr_as_master_addr(fake_scontrol: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_"))}
    env.update(REPO_DIR=str(REPO), RUN_ROOT="/runs", MODE="synthetic", ENV_CMD="env", RUN_JOB_DRY_RUN="1",
               SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_CPUS_PER_TASK="1",
               SLURM_JOB_NODELIST="n[1-2]", PATH=f"{fake_scontrol['PATH']}:{Path(sys.executable).parent}")
    proc = subprocess.run(["bash", str(REPO / "run_job.sh"), "lora"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "ranks=2 master=127.0.0.2:20007"
    assert "rendezvous 127.0.0.2:20007" in proc.stderr


def _rank_env(monkeypatch: pytest.MonkeyPatch, rank: int, host: str, port: int) -> None:
    for key, value in {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": host,
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_host_that_does_not_resolve_ends_the_rank_in_one_line_within_the_timeout(
        monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    _rank_env(monkeypatch, rank, "no-such-node.invalid", 29999)
    started = time.monotonic()
    with pytest.raises(RendezvousFailed) as info:
        init_world("cpu", timeout_s=1800, rendezvous_timeout_s=2)
    assert time.monotonic() - started < 10
    assert str(info.value).startswith(f"rank {rank} of 2: the rendezvous host no-such-node.invalid:29999 "
                                      "(MASTER_ADDR:MASTER_PORT) does not resolve (")
    assert "\n" not in str(info.value)


def test_every_rank_prints_the_rendezvous_line_and_exits_75(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Not rank 0 alone, as for other errors: each rank meets it on its own, and rank 0 may be missing."""
    from training import cli

    monkeypatch.setattr(cli, "_SPEAKS", [True])  # rank 1 silences the module's speaker; keep that local
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    _rank_env(monkeypatch, 1, "no-such-node.invalid", 29999)
    code = cli.main(["--mode", "synthetic", "--set", "train.progress=false", "--set", "train.rendezvous_timeout_s=1",
                     "--run-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 75
    assert len(err) == 1 and err[0].startswith("error: rank 1 of 2: the rendezvous host no-such-node.invalid:29999 "
                                               "(MASTER_ADDR:MASTER_PORT) does not resolve ("), err
    assert err[0].endswith("run the same command again to resume (exit 75)")
    assert not (tmp_path / "runs").exists()


# One process per case, forked from this one (torch is imported already: no second start-up): the watchdog
# ends the process itself, as the join blocks inside the backend.
def _join(rank: int, host: str, port: int, timeout: float, stderr: Path) -> multiprocessing.process.BaseProcess:
    def target() -> None:
        sys.stderr = open(stderr, "w")  # what the watchdog writes, away from pytest's capture
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR=host,
                          MASTER_PORT=str(port))
        init_world("cpu", 1800, timeout)
        os._exit(0)  # joined: the test fails on this code

    proc = multiprocessing.get_context("fork").Process(target=target)
    proc.start()
    return proc


def test_a_host_that_resolves_but_does_not_answer_ends_every_rank_in_one_line_and_75(tmp_path: Path) -> None:
    """Nothing listening at the port (rank 1), a listener that never speaks (rank 1), and rank 0 whose
    partner never comes: each ends at the deadline with one line naming host:port, never a retry loop."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) and never answers
    cases = {"nothing listens": (1, _free_port()), "silent listener": (1, silent.getsockname()[1]),
             "partner never comes": (0, _free_port())}
    started = time.monotonic()
    procs = {case: _join(rank, "127.0.0.1", port, 2, tmp_path / f"{rank}-{port}.err")
             for case, (rank, port) in cases.items()}
    try:
        for case, proc in procs.items():
            proc.join(timeout=60)
            rank, port = cases[case]
            err = (tmp_path / f"{rank}-{port}.err").read_text()
            assert proc.exitcode == 75, (case, err)
            assert [line for line in err.splitlines() if line.strip()] == [
                f"error: rank {rank} of 2: no rendezvous at 127.0.0.1:{port} within 2s (train.rendezvous_timeout_s): "
                "nothing answered there, or another rank never arrived; the run's files are untouched, run the same "
                "command again to resume (exit 75)"], (case, err)
        assert time.monotonic() - started < 30
    finally:
        silent.close()
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()
