"""scripts/torchrun.py: torchrun that exits with its ranks' common code, against what plain torchrun returns.

Plain torchrun exits 1 whatever its ranks return (75 after a stop, 2 after a refusal) and prints its
agent's traceback; the wrapper exits 75 when every rank stopped, a failed rank's code otherwise, in one
line (docs/distributed.md, "Launching"). The fast test runs a stand-in entry (tests/fixtures/
exit_ranks.py, no torch in the ranks); the slow ones run main.py on two gloo ranks.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.torchrun import StoppedBeforeStart, common_code, forward, summary
from tests.conftest import REPO, SMALL, only_run_dir, slow_steps

EXITS = str(REPO / "tests" / "fixtures" / "exit_ranks.py")


def launch(*args: str, plain: bool = False) -> list[str]:
    from tests.test_distributed import _free_port

    launcher = ["-m", "torch.distributed.run"] if plain else [str(REPO / "scripts" / "torchrun.py")]
    return [sys.executable, *launcher, "--nproc-per-node", "2", "--master-port", str(_free_port()), *args]


def run_launcher(*args: str, plain: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(launch(*args, plain=plain), cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_the_common_code_is_run_job_sh_s_rule() -> None:
    assert common_code({0: 75, 1: 75}) == 75  # every rank stopped
    assert common_code({0: 2, 1: 2}) == 2  # every rank refused the input
    assert common_code({1: 75}) == 75  # rank 0 finished (0 is never in torch's failures)
    assert common_code({0: 75, 1: 143}) == 75  # killed by SIGTERM before main.py's handler: a stop
    assert common_code({0: 75, 1: 137}) == 137  # rank 1 killed, rank 0 then lost contact: not a resumable stop
    assert common_code({0: 75, 1: 2}) == 2
    assert common_code({0: 1, 1: 2}) == 1  # several failures: the lowest rank's, as run_job.sh
    assert common_code({}) == 0
    assert summary({0: 75, 1: 137}, 2) == ("torchrun.py: rank 0 exited 75; rank 1 was killed by SIGKILL (137); "
                                           "exit 137: a rank that failed decides, whatever the others did after "
                                           "losing it")
    assert summary({1: 2}, 2) == "torchrun.py: rank 1 exited 2; the others 0; exit 2"


def test_the_launcher_exits_with_the_ranks_code_in_one_line() -> None:
    """Rank 0 exits 75, rank 1 is killed by SIGUSR2 (a stop that came before main.py's handler): 75, one
    line naming both, no traceback. Plain torchrun returns 1 here (the slow test below)."""
    proc = run_launcher(EXITS, "75", "SIGUSR2")
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "torchrun.py: rank 0 exited 75; rank 1 was killed by SIGUSR2 (140); exit 75: stopped, run the same "
        "command again to resume")
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr


def test_a_signal_before_any_rank_runs_ends_the_launch() -> None:
    with pytest.raises(StoppedBeforeStart, match="SIGUSR2") as info:
        forward(signal.SIGUSR2, None, pids=[])
    assert info.value.signum == signal.SIGUSR2


@pytest.mark.slow
@pytest.mark.parametrize("codes, plain_says, wrapper_says", [
    (["75", "75"], 1, 75), (["2", "2"], 1, 2), (["75", "2"], 1, 2), (["0", "0"], 0, 0)])
def test_plain_torchrun_exits_1_where_the_launcher_keeps_the_code(codes: list[str], plain_says: int,
                                                                  wrapper_says: int) -> None:
    plain = run_launcher(EXITS, *codes, plain=True)
    assert plain.returncode == plain_says, plain.stderr[-3000:]
    if plain_says:
        assert "Traceback" in plain.stderr and "ChildFailedError" in plain.stderr
    ours = run_launcher(EXITS, *codes)
    assert ours.returncode == wrapper_says, ours.stderr[-3000:]
    assert "Traceback" not in ours.stderr


TRAIN = [str(REPO / "main.py"), *SMALL, "--set", "train.epochs=2", "--set", "train.grad_accum=2"]


def _train_steps(run_dir: Path) -> list[tuple[int, int]]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [(r["period"], r["step"]) for r in rows if r.get("event") == "train"]


@pytest.mark.slow
def test_a_sigterm_to_the_launcher_stops_both_ranks_with_75_and_the_rerun_completes(tmp_path: Path) -> None:
    """SIGTERM to the launcher (scancel, kill, a scheduler): forwarded to both ranks, which agree on a step,
    save and exit 75; the launcher exits 75 (plain torchrun: 1, and it SIGKILLs ranks still saving after
    30 s); the same command then finishes the run."""
    from tests.test_distributed import wait_for_steps

    args = [*TRAIN, "--method", "lora", "--set", "checkpoint.every_steps=1",
            "--run-root", str(tmp_path / "runs")]
    launcher = subprocess.Popen(launch(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", **slow_steps(0.1)})
    wait_for_steps(tmp_path / "runs", launcher, 6)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 75, err[-3000:]
    assert "stopped: SIGTERM during period" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("torchrun.py: ranks 0, 1 exited 75; exit 75: stopped, run the same "
                                            "command again to resume")
    again = run_launcher(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step checkpoint" in again.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    assert (run_dir / "results.json").exists()
    steps = _train_steps(run_dir)
    assert len(steps) == len(set(steps))  # no step trained twice across the stop


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["--method", "lora"], ["--method", "full_ft", "--set", "train.strategy=fsdp"]],
                         ids=["ddp", "fsdp"])
def test_a_killed_rank_under_the_launcher_is_its_code_and_the_survivor_s_one_line(tmp_path: Path,
                                                                                  engine: list[str]) -> None:
    """SIGKILL to rank 1 mid-period: rank 0's next collective (DDP's all-reduce in the backward, FSDP's
    gathers, or the loop's own) fails, rank 0 prints the documented line and exits 75; the launcher exits
    137 (rank 1's death decides: not a resumable stop)."""
    from tests.test_distributed import rank_pids, wait_for_steps

    launcher = subprocess.Popen(launch(*TRAIN, *engine, "--run-root", str(tmp_path / "runs")), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_steps(tmp_path / "runs", launcher, 8)
    os.kill(rank_pids(launcher)[1], signal.SIGKILL)
    _, err = launcher.communicate(timeout=180)
    assert launcher.returncode == 137, err[-3000:]
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert [line for line in lines if line.startswith("error:")] == [
        next(line for line in lines if line.startswith("error: rank 0 lost contact with another rank of the run ("))]
    assert lines[-1] == ("torchrun.py: rank 0 exited 75; rank 1 was killed by SIGKILL (137); exit 137: a rank that "
                         "failed decides, whatever the others did after losing it")
