"""The pure parts of distributed training: who a process is, what a strategy accepts, how values merge."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from eval_and_metrics.shard import ONE
from training.config import RunConfig
from training.distributed import World, world_from_env
from training.methods import capability_problems
from training.strategies import STRATEGIES, Lockstep, resolve_strategy, strategy_problems


def test_the_world_comes_from_torchrun_then_from_a_multi_task_slurm_step() -> None:
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(1, 4, 1)
    slurm = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3", "SLURM_NTASKS": "8"}
    assert world_from_env(slurm) == World(3, 8, 3)
    # torchrun's variables win over Slurm's (torchrun under srun: one Slurm task, several ranks)
    assert world_from_env({**slurm, "RANK": "0", "WORLD_SIZE": "2"}) == World(0, 2, 0)
    # today's one-task job step is a world of one, whatever the allocation holds
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == World()
    assert world_from_env({}) == World()


def test_a_world_of_one_is_the_single_process_code() -> None:
    world = World()
    assert world.is_main and not world.active
    assert world.any(True) and not world.any(False)
    assert world.sum_float(2.5) == 2.5
    assert world.gather_objects("x") == ["x"]
    assert world.merge([1, 2]) == [1, 2] == ONE.merge([1, 2])
    assert all(world.owns(i) for i in range(5))


def test_eval_batches_are_dealt_round_robin() -> None:
    worlds = [World(r, 3) for r in range(3)]
    owners = [[w.rank for w in worlds if w.owns(b)] for b in range(7)]
    assert owners == [[0], [1], [2], [0], [1], [2], [0]]  # each batch exactly once


def test_fsdp_scores_in_lockstep() -> None:
    lock = Lockstep(World())
    assert lock.active and all(lock.owns(b) for b in range(4)) and lock.merge([None, 1]) == [None, 1]


def _train(**kw: object) -> SimpleNamespace:
    base = {"strategy": "auto", "optimizer": "adamw"}
    return SimpleNamespace(**{**base, **kw})


def test_auto_is_single_for_one_process_and_ddp_for_several() -> None:
    assert resolve_strategy("auto", World()) == "single"
    assert resolve_strategy("auto", World(0, 2)) == "ddp"
    assert resolve_strategy("fsdp", World(0, 2)) == "fsdp"
    assert set(STRATEGIES) == {"single", "ddp", "fsdp"}


@pytest.mark.parametrize("train,method,world,expected", [
    (_train(), "casm", World(0, 2), []),
    (_train(strategy="ddp"), "smf", World(), []),  # ddp on one process is the plain loop
    (_train(strategy="fsdp"), "full_ft", World(0, 2), []),
    (_train(strategy="single"), "lora", World(0, 2),
     ["train.strategy single runs one process, but the launcher started 2 ranks; valid with 2 ranks: auto, ddp, "
      "fsdp"]),
    (_train(strategy="fsdp"), "lora", World(0, 2),
     ["train.strategy fsdp runs only full_ft, not method 'lora': its trainable state is small enough to "
      "replicate, use train.strategy ddp"]),
    (_train(strategy="fsdp", optimizer="casmo"), "full_ft", World(0, 2),
     ["train.strategy fsdp runs train.optimizer adamw only (its state is gathered by name), not 'casmo'; valid "
      "with fsdp: adamw"]),
])
def test_strategy_problems_name_the_field_and_the_valid_values(train: SimpleNamespace, method: str, world: World,
                                                               expected: list[str]) -> None:
    """The strategy's own problems, and the method's (which strategies it declares), as the CLI checks them."""
    cfg = SimpleNamespace(method=SimpleNamespace(name=method, options=None), model=SimpleNamespace(quantize="none"),
                          train=SimpleNamespace(**vars(train), gradient_checkpointing=False, pack=False))
    strategy = resolve_strategy(train.strategy, world)
    assert capability_problems(cfg, strategy=strategy) + strategy_problems(train, world) == expected


def test_how_a_run_is_spread_is_not_part_of_its_identity() -> None:
    a, b = RunConfig(), RunConfig()
    b.train.strategy, b.train.gradient_checkpointing = "fsdp", True
    assert a.config_hash() == b.config_hash()
    b.train.mixed_precision = "bf16"  # changes the numbers: a different run
    assert a.config_hash() != b.config_hash()
    # runs made before these options existed keep their identity (and so resume)
    assert "mixed_precision" not in a.to_dict()["train"]


def test_several_ranks_without_a_rendezvous_address_is_one_line_and_exit_2(tmp_path, monkeypatch) -> None:
    from tests.conftest import SMALL, run_main

    proc = run_main(*SMALL, "--method", "lora", "--run-root", str(tmp_path),
                    env={"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: 2 ranks but MASTER_ADDR, MASTER_PORT unset: start the run with scripts/torchrun.py (torchrun that "
        "keeps the ranks' exit code), or with run_job.sh under Slurm, which sets them"]
    assert not tmp_path.joinpath("runs").exists() and not any(tmp_path.iterdir())


GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
              "[127.0.0.1]:32959: Connection reset by peer. This is typically caused by a remote worker hanging")


@pytest.mark.parametrize("raised, line", [
    (RuntimeError(GLOO_RESET), "rank 0 lost contact with another rank of the run ([/__w/pytorch/pytorch/"
     "third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:32959: Connection reset by peer. This "
     "is typically caused by a remote worker hanging)"),
    (None, None),  # a RuntimeError of a bug stays a traceback
])
def test_gloo_failing_inside_the_engine_is_the_lost_peer_line_and_75(
        raised: RuntimeError | None, line: str | None, tmp_path, monkeypatch, capsys) -> None:
    """Under gloo a peer killed while DDP all-reduces in the backward (or FSDP gathers) shows as a plain
    RuntimeError from gloo's transport, not as DistBackendError: the same line and exit 75 as the loop's own
    collectives. (The two-rank SIGKILL test meets it for real, when the kill lands in a backward.)"""
    from training import cli

    def run_one(*args, **kwargs):
        raise raised if raised is not None else RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(cli, "run_one", run_one)
    argv = ["--mode", "synthetic", "--set", "train.progress=false", "--run-root", str(tmp_path)]
    if raised is None:
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            cli.main(argv)
        return
    assert cli.main(argv) == 75
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {line}; the last checkpoint is intact, run the same command again to resume"]
