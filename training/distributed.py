"""The processes of one run: who they are, how they agree, and how they share work.

One run may span several processes (ranks): `scripts/torchrun.py --nproc-per-node N main.py ...` (torchrun
that keeps the ranks' exit code) locally, or one
Slurm task per GPU (`srun` in run_job.sh). The engine is torch.distributed (gloo on CPU, NCCL on GPUs);
the strategies that use it (DDP, FSDP) live in training/strategies.py. This module only knows the
world: its rank and size from the launcher's environment, the process group, and the few collective
operations the loop needs, each written so that a world of one is the plain single-process code.

Every rank holds the same run state (the same batch plan, the same replicated weights or the same
shards of them, the same RNG state), so rank 0 alone writes the run's files and the others only read.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from training.config import ConfigError
from training.signals import EXIT_RESUME

T = TypeVar("T")

# How long a collective may wait for a peer before it fails: long enough for rank 0 to write a full
# checkpoint while the others wait at the barrier, short enough that a lost rank ends the job. The run's
# value is train.collective_timeout_s (the same default); this one is for scripts without a config.
DEFAULT_TIMEOUT_S = 30 * 60
# How long joining the run may take (resolving MASTER_ADDR, reaching rank 0, every rank arriving): the
# ranks of one job start within seconds of each other, so minutes mean a host that does not resolve or
# answer, and waiting out the collective timeout (30 minutes of silent retries) would only hide that. The
# run's value is train.rendezvous_timeout_s.
DEFAULT_RENDEZVOUS_TIMEOUT_S = 120.0


class PeerLost(RuntimeError):
    """A collective failed because another rank died or stopped answering."""


class RendezvousFailed(PeerLost):
    """The ranks could not meet at MASTER_ADDR:MASTER_PORT. Every rank reports it itself (not rank 0 alone):
    each meets it on its own, and rank 0 may be the one that never came."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    # -- collectives (no-ops in a world of one) ------------------------------------------------
    def barrier(self) -> None:
        if self.active:
            _call(dist.barrier)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one: the agreed stop flag."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
        _call(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum each tensor over the ranks, in place (statistics a method counts in the forward)."""
        if not self.active:
            return
        for t in tensors:
            _call(dist.all_reduce, t, op=dist.ReduceOp.SUM)

    def sum_float(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
        _call(dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.size
        _call(dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        _call(dist.broadcast_object_list, box, src=0)
        return box[0]

    # -- eval_and_metrics.shard.Shard: how scorers share an evaluation ------------------------
    def owns(self, index: int) -> bool:
        """Work items (eval batches) are dealt round-robin: item i belongs to rank i % size."""
        return index % self.size == self.rank

    def agree(self, flag: bool) -> bool:
        return self.any(flag)

    def merge(self, values: list[T | None]) -> list[T]:
        """Each position's value from the rank that computed it (the others hold None there)."""
        if not self.active:
            return values  # type: ignore[return-value]
        shares = self.gather_objects(values)
        return [next((v for v in column if v is not None), None) for column in zip(*shares)]  # type: ignore[misc]

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it creates files), the others after it is done (they read them).

        An exception on rank 0 is passed to the others, so every rank fails the same way rather than
        some of them waiting at a barrier for a rank that has left.
        """
        error: BaseException | None = None
        if self.is_main:
            try:
                yield
            except BaseException as exc:  # noqa: BLE001 - re-raised below after telling the others
                error = exc
            failed = self.broadcast_object(None if error is None else _portable(error))
            if error is not None:
                raise error
        else:
            failed = self.broadcast_object(None)
            if failed is not None:
                raise failed
            yield


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it pickles (a ConfigError, a StorageError), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}")


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A collective; a dead peer becomes PeerLost (one clear line) instead of a backend traceback."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as exc:  # gloo: "Connection closed by peer", timeouts
        raise peer_lost(exc) from exc


def peer_lost(exc: BaseException) -> PeerLost:
    """A backend failure raised outside `_call` (DDP's gradient all-reduce, FSDP's gathers, a DTensor's
    norm) as the same one line: under NCCL these are where a lost peer usually shows."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return PeerLost(f"rank {rank} lost contact with another rank of the run ({' '.join(str(exc).split())[:200]})")


def engine_peer_lost(exc: BaseException) -> PeerLost | None:
    """`exc` as the lost-peer line when it is a backend failure of a collective the engine ran itself
    (DDP's all-reduce in the backward, FSDP's gathers, a DTensor's norm), else None: a bug stays a traceback.
    NCCL raises DistBackendError; gloo a plain RuntimeError from its transport, whose message names gloo's
    source ("[.../gloo/transport/tcp/pair.cc:545] Read error ...: Connection reset by peer")."""
    if isinstance(exc, PeerLost):
        return exc
    if isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and "gloo/transport/" in str(exc)):
        return peer_lost(exc)
    return None


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The launcher's view: torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else Slurm's task ids under srun.

    Slurm's variables count only when the job step has several tasks: a one-task step (today's
    run_job.sh) is a world of one whatever the allocation.
    """
    env = dict(os.environ) if env is None else env
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)))
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1)
    if ntasks > 1 and "SLURM_PROCID" in env:
        return World(rank=int(env["SLURM_PROCID"]), size=ntasks, local_rank=int(env.get("SLURM_LOCALID", 0)))
    return World()


def device_index(local_rank: int, device_count: int) -> int:
    """The visible GPU of the rank with this node-local rank. torchrun, or srun with every GPU visible to
    every task: the local rank's own GPU. srun with --gpus-per-task=1 or --gpu-bind: each task sees only
    its GPU, as device 0. Anything else (two ranks on one visible GPU, more ranks than GPUs) is a launch
    that does not match the allocation."""
    if 0 <= local_rank < device_count:
        return local_rank
    if device_count == 1:
        return 0
    raise ConfigError(
        [
            (
                f"local rank {local_rank} needs its own GPU, but this task sees {device_count} "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one rank "
                f"per visible GPU, or give each task one GPU (srun --gpus-per-task=1)"
            )
        ]
    )


def ranks_per_node(env: Mapping[str, str]) -> int:
    """How many ranks the launcher started on the busiest node: torchrun's LOCAL_WORLD_SIZE, else Slurm's
    SLURM_STEP_TASKS_PER_NODE ("4(x2)", "2,1"); 0 when neither says."""
    if env.get("LOCAL_WORLD_SIZE", "").isdigit():
        return int(env["LOCAL_WORLD_SIZE"])
    counts = [part.split("(")[0] for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(",")]
    return max((int(c) for c in counts if c.isdigit()), default=0)


def nccl_error_handling() -> None:
    """Make a lost peer, or a collective past the process group's timeout, end this rank in the one-line
    "lost contact" error and exit 75 instead of a crash.

    NCCL's watchdog thread notices a failed or timed-out collective; what it then does is
    TORCH_NCCL_ASYNC_ERROR_HANDLING: torch's default (3) and torchrun's (1) end the whole process with
    SIGABRT, which prints none of our lines and exits 134, which run_job.sh counts as a crash. 2 aborts the
    communicators only: the kernels stuck in the collective return, and the rank's next collective raises
    (DistBackendError), which the CLI reports as a lost peer. Nothing is written on the way: every write
    follows a collective (the stop flag, the state gather). Forced, not defaulted, because torchrun
    exports 1 into every worker. Must be set before the process group exists (read once, at creation)."""
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"


def init_world(
    device_kind: str, timeout_s: float = DEFAULT_TIMEOUT_S, rendezvous_timeout_s: float = DEFAULT_RENDEZVOUS_TIMEOUT_S
) -> World:
    """Join the process group when the launcher started several ranks; a world of one joins nothing.

    Under Slurm without torchrun, MASTER_ADDR and MASTER_PORT come from run_job.sh (the first node's
    NodeAddr, training/rendezvous.py; a port derived from the job id), and the rank from SLURM_PROCID.
    Joining takes at most `rendezvous_timeout_s`; after that every rank ends with RendezvousFailed (one
    line naming host:port, exit 75), whatever the backend would have retried.
    """
    world = world_from_env()
    if not world.active or dist.is_initialized():
        return world
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(
            [
                (
                    f"{world.size} ranks but {', '.join(missing)} unset: start the run with "
                    "scripts/torchrun.py (torchrun that keeps the ranks' exit code), or with run_job.sh under "
                    "Slurm, which sets them"
                )
            ]
        )
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(world.size))
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    device: torch.device | None = None
    if use_cuda:
        count = torch.cuda.device_count()
        # every rank checks the node's highest local rank too, so a mismatch is one line and exit 2 on all of
        # them (rank 0 included) rather than the others waiting for the failed ranks at the rendezvous
        device_index(max(world.local_rank, ranks_per_node(os.environ) - 1), count)
        device = torch.device("cuda", device_index(world.local_rank, count))
        torch.cuda.set_device(device)  # models.resolve_device and the collectives use the current device
        nccl_error_handling()
    host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    where = f"{host}:{port}"
    deadline = time.monotonic() + rendezvous_timeout_s
    # The backend's own connect loop keeps retrying for the whole process-group timeout, and prints a C++
    # stack trace per failed name lookup; the watchdog ends the rank at the deadline instead, from a thread
    # because the join blocks in C++ (with the GIL released) and cannot be interrupted from Python.
    watchdog = threading.Timer(
        rendezvous_timeout_s,
        _rendezvous_expired,
        args=(
            (
                f"rank {world.rank} of {world.size}: no rendezvous at {where} within "
                f"{rendezvous_timeout_s:g}s (train.rendezvous_timeout_s): nothing answered "
                "there, or another rank never arrived"
            ),
        ),
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        _resolve(host, port, world, deadline, rendezvous_timeout_s)
        # device_id binds the NCCL communicator to this rank's GPU at once (no guess from the rank number)
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=world.rank,
            world_size=world.size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device,
        )
    except (RuntimeError, dist.DistError) as exc:  # port taken, connection reset
        if isinstance(exc, RendezvousFailed):
            raise
        raise RendezvousFailed(
            f"rank {world.rank} of {world.size} could not join the run at {where} ({' '.join(str(exc).split())[:200]})"
        ) from None
    finally:
        watchdog.cancel()
    return world


def _resolve(host: str, port: str, world: World, deadline: float, timeout_s: float) -> None:
    """Wait until `host` resolves (a name service may lag behind a node's start), at most until the deadline.

    Checked here rather than left to the backend, which retries a name that does not resolve in silence
    (or with a stack trace per try) for the whole process-group timeout."""
    while True:
        try:
            socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)  # the port is the backend's to check
            return
        except socket.gaierror as exc:
            error = exc.strerror or str(exc)
        if time.monotonic() + 1.0 > deadline:
            raise RendezvousFailed(
                f"rank {world.rank} of {world.size}: the rendezvous host {host}:{port} "
                f"(MASTER_ADDR:MASTER_PORT) does not resolve ({error}) after {timeout_s:g}s "
                "(train.rendezvous_timeout_s); under Slurm it is the first node's NodeAddr "
                "(docs/slurm.md)"
            )
        time.sleep(1.0)


def _rendezvous_expired(message: str) -> None:
    """The watchdog: one line and exit 75, now; nothing of the run was written yet."""
    sys.stdout.flush()
    sys.stderr.write(
        f"error: {message}; the run's files are untouched, run the same command again to resume (exit {EXIT_RESUME})\n"
    )
    sys.stderr.flush()
    os._exit(EXIT_RESUME)  # the main thread is stuck inside the backend; a normal exit would wait for it


def close_world() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
