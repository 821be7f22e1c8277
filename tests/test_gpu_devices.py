"""What a run does with its devices on CUDA, checked on CPU with the device abstracted (issue 25).

No GPU runs here, so each test builds the condition CUDA would create: state files whose tensors are
tagged "cuda:0", torch.cuda functions replaced by fakes that count what is asked of them, the process
group's start intercepted. docs/distributed.md, "GPU readiness", says what each guards.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.serialization

from artifacts import load_state, save_state
from training import distributed, seeding
from training.config import ConfigError, RunConfig
from training.distributed import device_index, init_world
from training.trainer import Trainer


# -- 1. state loads to the CPU; the code that owns the device places it ---------------------------------

def _saved_on_cuda(monkeypatch: pytest.MonkeyPatch, path: Path, obj: Any) -> None:
    """Write `obj` as a GPU process writes it: every storage tagged with the device it lived on."""
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_state(path, obj)


def test_a_state_saved_from_cuda_loads_on_the_cpu_and_the_optimizer_places_its_moments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    path = tmp_path / "trainer_state.pt"
    _saved_on_cuda(monkeypatch, path, {"optimizer": optimizer.state_dict()})
    # without map_location torch would rebuild the moments on cuda:0 (here: "CUDA not available", which
    # load_state reported as a file altered by something else, exit 65)
    state = load_state(path)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    assert moments and all(t.device.type == "cpu" for t in moments)
    # the device is the parameters' business: optimizer.load_state_dict moves each moment next to its
    # parameter (shown with parameters on the meta device, the stand-in for "not the CPU")
    on_meta = torch.nn.Linear(4, 3, device="meta")
    fresh = torch.optim.AdamW(on_meta.parameters(), lr=1e-3)
    fresh.load_state_dict(state["optimizer"])
    assert all(v.device.type == "meta" for s in fresh.state.values() for k, v in s.items() if k != "step")


# -- 2. the RNG state of the current device only -------------------------------------------------------

class FakeCuda:
    """torch.cuda's RNG and device functions for a process that sees `count` GPUs."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}
        self.current = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self.current].clone())
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i].clone() for i in range(self.count)])
        monkeypatch.setattr(torch.cuda, "set_rng_state", self._set)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: [self._set(s, i) for i, s in enumerate(states)])
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: setattr(self, "current", torch.device(d).index or 0))

    def _set(self, state: torch.Tensor, device: Any = "cuda") -> None:
        index = self.current if device == "cuda" else int(device)
        if index >= self.count:
            raise IndexError(f"device {index} of {self.count}")  # what torch raises for a missing device
        self.states[index] = state.clone()


def test_the_rng_state_is_the_current_devices_and_restores_with_fewer_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    eight = FakeCuda(8)
    eight.install(monkeypatch)
    eight.states[0] = torch.full((16,), 42, dtype=torch.uint8)
    saved = seeding.rng_state()
    assert isinstance(saved["cuda"], torch.Tensor)  # one generator: this process's device
    one = FakeCuda(1)  # the resumed job: one GPU per task
    one.install(monkeypatch)
    seeding.set_rng_state(saved)
    assert torch.equal(one.states[0], torch.full((16,), 42, dtype=torch.uint8))


def test_a_checkpoint_with_every_devices_rng_state_still_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Written before the fix (get_rng_state_all, by rank 0 on 4 GPUs): rank 0's own device, the first,
    goes onto the current device, whatever the resumed job sees."""
    one = FakeCuda(1)
    one.install(monkeypatch)
    old = {**seeding.rng_state(), "cuda": [torch.full((16,), 7 + i, dtype=torch.uint8) for i in range(4)]}
    seeding.set_rng_state(old)
    assert torch.equal(one.states[0], torch.full((16,), 7, dtype=torch.uint8))


# -- 3. the local rank mapped onto the visible devices, and passed to the process group -----------------

def test_the_local_rank_maps_onto_the_visible_gpus() -> None:
    assert [device_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # torchrun, or srun with every GPU visible
    assert [device_index(r, 1) for r in range(4)] == [0, 0, 0, 0]  # srun --gpus-per-task=1 / --gpu-bind
    with pytest.raises(ConfigError, match="local rank 3 needs its own GPU, but this task sees 2"):
        device_index(3, 2)


def test_every_rank_of_a_node_refuses_a_launch_with_more_ranks_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 (local rank 0, which has a GPU) must fail too, or it waits at the rendezvous for the ranks
    that failed until the timeout."""
    FakeCuda(2).install(monkeypatch)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: pytest.fail("joined a mismatched launch"))
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="local rank 3 needs its own GPU, but this task sees 2"):
        init_world("cuda")
    assert distributed.ranks_per_node({"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == 4
    assert distributed.ranks_per_node({"SLURM_STEP_TASKS_PER_NODE": "2,3"}) == 3
    assert distributed.ranks_per_node({}) == 0


@pytest.mark.parametrize("visible, local_rank, expected", [(1, 3, 0), (4, 2, 2)])
def test_init_world_sets_the_mapped_device_and_gives_it_to_the_process_group(
        monkeypatch: pytest.MonkeyPatch, visible: int, local_rank: int, expected: int) -> None:
    cuda = FakeCuda(visible)
    cuda.install(monkeypatch)
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append({"backend": backend, **kw}))
    for key, value in {"RANK": str(local_rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(local_rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    for key in ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "LOCAL_WORLD_SIZE", "SLURM_STEP_TASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    world = init_world("cuda", timeout_s=90)
    assert world.local_rank == local_rank and cuda.current == expected
    assert calls[0]["backend"] == "nccl" and calls[0]["device_id"] == torch.device("cuda", expected)
    assert calls[0]["timeout"].total_seconds() == 90
    # 12b: a failed collective aborts the communicators and raises here, never SIGABRT from the watchdog
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "2"


def test_a_backend_error_from_an_engine_collective_is_the_lost_peer_line_and_75(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Under NCCL a lost peer shows in DDP's or FSDP's own collectives as DistBackendError (after the
    communicators were aborted), not in the loop's wrapped ones: same line, same exit 75."""
    from training import cli

    def lost(*args: Any, **kwargs: Any) -> None:
        raise dist.DistBackendError("NCCL communicator was aborted on rank 0.\nwatchdog timeout")

    monkeypatch.setattr(cli, "run_one", lost)
    code = cli.main(["--mode", "synthetic", "--set", "train.progress=false", "--run-root", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 75
    assert err == ["error: rank 0 lost contact with another rank of the run (NCCL communicator was aborted on "
                   "rank 0. watchdog timeout); the last checkpoint is intact, run the same command again to resume"]


# -- 12a. CUDA determinism as an option that leaves existing runs alone ---------------------------------

def test_deterministic_is_an_option_outside_the_runs_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    plain, strict = RunConfig(), RunConfig()
    strict.train.deterministic = True
    assert "deterministic" not in plain.to_dict()["train"]  # saved configs of existing runs unchanged
    assert strict.to_dict()["train"]["deterministic"] is True
    assert plain.config_hash() == strict.config_hash()  # switching it keeps the run id and resumes
    patient = RunConfig()
    patient.train.collective_timeout_s = 7200.0  # 12b: how long a rank waits for a lost peer, a runtime setting
    assert "collective_timeout_s" not in plain.to_dict()["train"] and patient.config_hash() == plain.config_hash()

    calls: list[tuple[bool, bool]] = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda on, warn_only=False: calls.append((on, warn_only)))
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seeding.use_deterministic(False)
    assert calls == [] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seeding.use_deterministic(True)
    assert calls == [(True, True)] and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark


# -- 12c. the peak-memory figure belongs to its period ----------------------------------------------------

def test_the_cuda_peak_is_reset_at_every_period_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    resets: list[Any] = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    Trainer._reset_peak_memory(SimpleNamespace(device=torch.device("cpu")))  # type: ignore[arg-type]
    assert resets == []
    Trainer._reset_peak_memory(SimpleNamespace(device=torch.device("cuda", 1)))  # type: ignore[arg-type]
    assert resets == [torch.device("cuda", 1)]

    from training import cli

    periods: list[int] = []
    real = Trainer._reset_peak_memory
    monkeypatch.setattr(Trainer, "_reset_peak_memory", lambda self: (periods.append(1), real(self)))
    assert cli.main(["--mode", "synthetic", "--set", "data.num_facts=8", "--set", "train.epochs=1",
                     "--set", "train.max_batch_size=4", "--set", "train.progress=false", "--method", "full_ft",
                     "--run-root", str(tmp_path)]) == 0
    assert len(periods) == _num_periods(tmp_path) >= 2


def _num_periods(root: Path) -> int:
    (run_dir,) = [d for d in root.iterdir() if d.is_dir()]
    return sum(1 for d in (run_dir / "periods").iterdir() if not d.name.startswith("0-"))


# -- 7. FSDP resume: rank 0 reads the files, the others receive their shards ------------------------------

def _tiny_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 4))
    model._no_split_modules = ["Linear"]  # type: ignore[assignment]  # FSDP.prepare's units, as in a transformer
    return model


def _fsdp_rank(rank: int, size: int, port: int, directory: str, out: str) -> None:
    """One rank of a 2-rank gloo group: load a checkpoint through FSDP and report what it read."""
    import json

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from training import checkpointer, strategies
    from training.distributed import World

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    reads: list[str] = []
    real_tensors, real_state = checkpointer.load_tensors, checkpointer.load_state
    checkpointer.load_tensors = lambda p: (reads.append(Path(p).name), real_tensors(p))[1]  # type: ignore[assignment]
    checkpointer.load_state = lambda p: (reads.append(Path(p).name), real_state(p))[1]  # type: ignore[assignment]
    model = _tiny_model(seed=1)  # other weights than the checkpoint's: the load must replace them
    strategy = strategies.FSDP(World(rank, size, rank), torch.device("cpu"))
    strategy.prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt = Path(directory)
    method = SimpleNamespace(load_state_dict=lambda state: None)
    kept: dict[str, Any] = {}  # what the scheduler and position parts are handed
    parts: dict[str, Any] = {"optimizer": checkpointer.Optimizer(strategy, model, optimizer),
                             **{k: SimpleNamespace(load_state_dict=lambda v, k=k: kept.__setitem__(k, v))
                                for k in ("scheduler", "position")}}
    checkpointer.Checkpointer(strategy, method, model).load(ckpt, parts)  # type: ignore[arg-type]
    # gathered back to rank 0 exactly as a checkpoint would be: both ranks' shards must hold the file's values
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    moments = strategy.optimizer_state(model, optimizer)
    result: dict[str, Any] = {"reads": reads, "scheduler": kept["scheduler"], "position": kept["position"]}
    if rank == 0:
        saved_w = real_tensors(ckpt / "trainable.safetensors")
        saved_o = real_state(ckpt / "trainer_state.pt")["optimizer"]
        result["weights_equal"] = sorted(weights) == sorted(saved_w) and all(
            torch.equal(weights[n], saved_w[n]) for n in saved_w)
        result["moments_equal"] = all(
            torch.equal(torch.as_tensor(moments["state"][i][k]), torch.as_tensor(v))
            for i, s in saved_o["state"].items() for k, v in s.items())
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_resume_reads_the_files_on_rank_0_only_and_every_shard_gets_its_values(tmp_path: Path) -> None:
    import json

    import torch.multiprocessing as mp
    from safetensors.torch import save_file

    from tests.test_distributed import _free_port

    model = _tiny_model(seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 6)).pow(2).sum().backward()
    optimizer.step()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(ckpt / "trainable.safetensors"))
    save_state(ckpt / "method_state.pt", {})
    save_state(ckpt / "trainer_state.pt", {"optimizer": optimizer.state_dict(), "scheduler": {"last_epoch": 5},
                                           "rng": seeding.rng_state(), "position": {"step": 5}})
    mp.spawn(_fsdp_rank, args=(2, _free_port(), str(ckpt), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["weights_equal"] and rank0["moments_equal"]
    assert sorted(rank0["reads"]) == ["method_state.pt", "trainable.safetensors", "trainer_state.pt"]
    assert rank1["reads"] == ["method_state.pt"]  # the small method state; the big files only on rank 0
    assert rank1["scheduler"] == {"last_epoch": 5} and rank1["position"] == {"step": 5}
