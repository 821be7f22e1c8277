"""One run on two CPU ranks (torchrun, gloo) against the same run on one process.

Exactness (docs/distributed.md): with train.grad_accum equal to the world size each rank computes one
micro-batch per step and the all-reduce adds the same two gradients one process adds (a + b = b + a,
and DDP's division by 2 is exact), so runs are equal bit for bit: losses, final state and every score.
With another deal (grad_accum 3 on 2 ranks) the sum is the same but its order differs, so float32
rounding differs in the last bits; those runs agree within a stated tolerance.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SMALL, comparable, log_rows, only_run_dir, read_results, run_main, train_records

pytestmark = pytest.mark.slow

EXACT = ["--set", "train.grad_accum=2"]
SHORT = [*SMALL, "--set", "train.epochs=2"]  # every test here starts two torch processes: keep the runs short
SLOW_STEPS = ["--set", "train.step_sleep=0.1", "--set", "checkpoint.every_steps=1"]


def torchrun_cmd(*args: str, ranks: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
            "--master-port", str(_free_port()), str(REPO / "main.py"), *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(*args: str, ranks: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(torchrun_cmd(*args, ranks=ranks), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def start_ranks(*args: str) -> subprocess.Popen:
    return subprocess.Popen(torchrun_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes (read from their environment)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != launcher.pid:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(entry.name)
    return out


def wait_for_steps(root: Path, launcher: subprocess.Popen, steps: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        dirs = [d for d in root.iterdir() if d.is_dir()] if root.exists() else []
        if dirs and sum(1 for r in log_rows(dirs[0]) if r.get("event") == "train") >= steps:
            return
        if launcher.poll() is not None:
            raise AssertionError(f"ended early ({launcher.returncode}): {launcher.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training steps")


@pytest.fixture(scope="module")
def one_rank_lora(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("one-rank")
    proc = run_main(*SHORT, *EXACT, "--method", "lora", "--run-root", str(root))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(root)
    return {**read_results(run_dir), "records": train_records(run_dir), "run_dir": run_dir}


def test_every_method_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """The contract matrix under ddp: every method's losses, final state and scores, bit for bit."""
    args = [*SHORT, *EXACT, "--method", "all"]
    single = run_main(*args, "--run-root", str(tmp_path / "one"), timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    ranks = run_ranks(*args, "--run-root", str(tmp_path / "two"), timeout=900)
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    one = sorted(d for d in (tmp_path / "one").iterdir() if d.is_dir())
    two = sorted(d for d in (tmp_path / "two").iterdir() if d.is_dir())
    assert [d.name for d in one] == [d.name for d in two]  # world size is not part of a run's identity
    for a, b in zip(one, two):
        assert train_records(a) == train_records(b), a.name
        assert comparable(read_results(a)) == comparable(read_results(b)), a.name
        # the eval rows themselves, base row included: the report cannot tell how many ranks scored them
        for period in sorted((a / "periods").iterdir()):
            assert ((period / "eval" / "predictions.jsonl").read_bytes()
                    == (b / "periods" / period.name / "eval" / "predictions.jsonl").read_bytes()), period
        manifest = json.loads((b / "periods" / "1-2018" / "manifest.json").read_text())
        assert (manifest["world_size"], manifest["strategy"], manifest["per_rank_micro_batches"]) == (2, "ddp", 1)
    run_json = json.loads((two[0] / "run.json").read_text())
    assert run_json["world_size"] == 2 and run_json["global_batch_micro_batches"] == 2


def test_an_uneven_deal_agrees_within_float_tolerance(tmp_path: Path) -> None:
    """grad_accum 3 on 2 ranks: rank 0 sums micro-batches 0 and 2, rank 1 holds 1; the same gradient added
    in another order. float32 addition rounds differently, Adam carries it on: relative 1e-3 on losses.
    Full fine-tuning, where every weight moves, is the case that drifts most (lora drifts less)."""
    args = [*SMALL, "--set", "train.grad_accum=3", "--method", "full_ft"]
    assert run_main(*args, "--run-root", str(tmp_path / "one")).returncode == 0
    proc = run_ranks(*args, "--run-root", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a in sorted(d for d in (tmp_path / "one").iterdir() if d.is_dir()):
        b = tmp_path / "two" / a.name
        ra, rb = train_records(a), train_records(b)
        assert len(ra) == len(rb) > 10
        for x, y in zip(ra, rb):
            assert x["step"] == y["step"] and x["tokens"] == y["tokens"]
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-3), (a.name, x["period"], x["step"])


STREAM = """name: three-scorers
tasks:
  - name: math
    source: {type: generated, domain: math, num_train: 6, num_eval: 5}
    scorer: numeric
    train_split: train
    eval_split: test
  - name: mc
    source: {type: generated, domain: multiple_choice, num_train: 6, num_eval: 5}
    scorer: multiple_choice
    train_split: train
    eval_split: test
  - name: style
    source: {type: generated, domain: style, num_train: 6, num_eval: 5}
    scorer: perplexity
    train_split: train
    eval_split: test
    loss_on: all
"""


def test_a_stream_scored_on_two_ranks_equals_one_process(tmp_path: Path) -> None:
    """Generation, multiple-choice and perplexity scorers share their batches and merge them exactly."""
    stream = tmp_path / "stream.yaml"
    stream.write_text(STREAM)
    args = ["--mode", "synthetic", "--stream", str(stream), "--method", "lora", *EXACT, "--set", "train.epochs=1",
            "--set", "train.progress=false", "--set", "eval.batch_size=2", "--set", "eval.max_new_tokens=6"]
    assert run_main(*args, "--run-root", str(tmp_path / "one")).returncode == 0
    proc = run_ranks(*args, "--run-root", str(tmp_path / "two"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = only_run_dir(tmp_path / "one"), only_run_dir(tmp_path / "two")
    assert comparable(read_results(a)) == comparable(read_results(b))
    for period in sorted((a / "periods").iterdir()):
        assert ((period / "eval" / "predictions.jsonl").read_bytes()
                == (b / "periods" / period.name / "eval" / "predictions.jsonl").read_bytes())


def test_a_stop_to_one_rank_stops_both_and_resumes_on_one(tmp_path: Path, one_rank_lora: dict) -> None:
    """SIGUSR2 to rank 1 only: the ranks agree at the next step, rank 0 saves, both exit 75; the run then
    finishes on ONE process (another world size) with the uninterrupted run's numbers."""
    root = tmp_path / "runs"
    args = [*SHORT, *EXACT, *SLOW_STEPS, "--method", "lora", "--run-root", str(root)]
    launcher = start_ranks(*args)
    wait_for_steps(root, launcher, 6)
    os.kill(rank_pids(launcher)[1], signal.SIGUSR2)
    _, err = launcher.communicate(timeout=120)
    assert "stopped: SIGUSR2 on rank 1 during period" in err  # rank 0 speaks for both, no traceback of ours
    assert "exitcode  : 75" in err and "exitcode  : -9" not in err  # both left on their own, with 75
    run_dir = only_run_dir(root)
    assert list((run_dir / "checkpoints").glob("*/step-*"))
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step checkpoint" in proc.stderr
    assert comparable(read_results(run_dir)) == comparable(one_rank_lora)
    assert train_records(run_dir) == one_rank_lora["records"]


def test_a_kill_of_one_rank_fails_cleanly_and_resumes_on_two(tmp_path: Path, one_rank_lora: dict) -> None:
    """SIGKILL to rank 1 mid-period: rank 0 fails its next collective with one line (never hangs), the last
    committed state stays valid, and a two-rank rerun ends with the uninterrupted one-process numbers."""
    root = tmp_path / "runs"
    args = [*SHORT, *EXACT, *SLOW_STEPS, "--method", "lora", "--run-root", str(root)]
    launcher = start_ranks(*args)
    first_period = sum(1 for r in one_rank_lora["records"] if r["period"] == 1)
    wait_for_steps(root, launcher, first_period + 3)  # into period 2: one committed period behind it
    os.kill(rank_pids(launcher)[1], signal.SIGKILL)
    launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    proc = run_ranks(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = only_run_dir(root)
    assert comparable(read_results(run_dir)) == comparable(one_rank_lora)
    assert train_records(run_dir) == one_rank_lora["records"]


def test_a_one_process_run_resumes_on_two_ranks(tmp_path: Path, one_rank_lora: dict) -> None:
    root = tmp_path / "runs"
    args = [*SHORT, *EXACT, *SLOW_STEPS, "--method", "lora", "--run-root", str(root)]
    from tests.conftest import main_cmd

    proc = subprocess.Popen(main_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(root, proc, 8)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 75
    again = run_ranks(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    run_dir = only_run_dir(root)
    assert comparable(read_results(run_dir)) == comparable(one_rank_lora)
    assert train_records(run_dir) == one_rank_lora["records"]


def test_fsdp_full_ft_agrees_and_its_step_checkpoint_resumes_on_one_process(tmp_path: Path) -> None:
    """FSDP2 shards full fine-tuning over 2 ranks; stopped mid-period (SIGUSR2 to rank 0), its gathered
    step checkpoint resumes on ONE process. The sharded reduce-scatter and the sharded gradient norm add in
    another order than one process, so the run agrees within float tolerance (relative 1e-3 on losses)."""
    args = [*SHORT, *EXACT, "--method", "full_ft"]
    assert run_main(*args, "--run-root", str(tmp_path / "one")).returncode == 0
    root = tmp_path / "fsdp"
    launcher = start_ranks(*args, *SLOW_STEPS, "--set", "train.strategy=fsdp", "--run-root", str(root))
    wait_for_steps(root, launcher, 4)
    os.kill(rank_pids(launcher)[0], signal.SIGUSR2)
    _, err = launcher.communicate(timeout=120)
    assert "stopped: SIGUSR2 during period" in err, err[-3000:]
    run_dir = only_run_dir(root)
    manifests = [json.loads(m.read_text()) for m in run_dir.glob("checkpoints/*/*/manifest.json")]
    assert manifests and all((m["world_size"], m["strategy"]) == (2, "fsdp") for m in manifests)
    proc = run_main(*args, "--run-root", str(root))  # strategy auto: single on one process
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from step checkpoint" in proc.stderr
    one = only_run_dir(tmp_path / "one")
    ra, rb = train_records(one), train_records(run_dir)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3), (x["period"], x["step"])


def test_strategy_problems_are_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_main(*SMALL, "--method", "lora", "--set", "train.strategy=fsdp", "--run-root", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: train.strategy fsdp")
    proc = run_main(*SMALL, "--method", "smf", "--set", "train.gradient_checkpointing=true",
                    "--run-root", str(tmp_path))
    assert proc.returncode == 2 and "train.gradient_checkpointing" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_gradient_checkpointing_changes_no_number_and_bf16_autocast_trains(tmp_path: Path) -> None:
    """Checkpointing recomputes each layer's forward in the backward (non-reentrant, RNG state preserved):
    the same operations on the same inputs, so the run is identical. bf16 autocast is another run (its own
    identity) that must still train."""
    args = [*SHORT, "--method", "full_ft"]  # every weight trains: the strictest case
    assert run_main(*args, "--run-root", str(tmp_path / "plain")).returncode == 0
    proc = run_main(*args, "--set", "train.gradient_checkpointing=true", "--run-root", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a in sorted(d for d in (tmp_path / "plain").iterdir() if d.is_dir()):
        b = tmp_path / "ckpt" / a.name  # the same run id: checkpointing is not part of a run's identity
        assert train_records(a) == train_records(b)
        assert comparable(read_results(a)) == comparable(read_results(b))
    proc = run_main(*SHORT, "--method", "lora", "--set", "train.mixed_precision=bf16", "--run-root", str(tmp_path / "bf16"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = train_records(only_run_dir(tmp_path / "bf16"))
    assert all(r["loss"] == r["loss"] for r in records) and records[-1]["loss"] < records[0]["loss"]
