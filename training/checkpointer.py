"""What a checkpoint holds, in one place: its parts, its files, and how they are saved and loaded.

A checkpoint is a directory of three files over the run's stateful parts. Each part is an object with
`state_dict()` and `load_state_dict(state)` (the Stateful protocol torchtitan's CheckpointManager saves
and loads over); the checkpointer asks every part for its state, writes the files, and hands each part
its state back on a resume:

    trainable.safetensors   trainable   the method's trainable tensors (full, unsharded)
    method_state.pt         method      the method's own state (Fisher, replay buffer, memory keys ...)
    trainer_state.pt        step checkpoint: optimizer, scheduler, rng, position (in this key order)
                            committed period: rng, and position "done"

A step checkpoint (checkpoints/<k>-<name>/step-N/) and a committed period (periods/<k>-<name>/) hold the
same three files; a period only has no optimizer to resume (each period builds its own). The strategy
(training/strategies.py) says how a part is gathered from and spread over the ranks (sharded under
fsdp, where rank 0 alone reads the big files); the files always hold full tensors, so a checkpoint reads
back on any world size and any strategy. State files never run code when read (artifacts/state.py).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from artifacts import StorageError, load_state, load_tensors, save_state, save_tensors
from training.distributed import World
from training.methods.base import Method
from training.run import human_bytes
from training.seeding import rng_state, set_rng_state
from training.strategies import Single, Strategy

TRAINABLE_FILE = "trainable.safetensors"
METHOD_FILE = "method_state.pt"
TRAINER_FILE = "trainer_state.pt"


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class Position:
    """Where a period's training stands (the data position): a resume continues from exactly here."""

    epoch: int = 0
    batch: int = 0  # index of the next micro-batch within the epoch
    step: int = 0  # optimizer steps done in this period
    tokens: int = 0  # non-padding tokens trained on in this period

    def state_dict(self) -> dict[str, int]:
        return vars(self).copy()

    def load_state_dict(self, state: dict[str, int]) -> None:
        vars(self).update(vars(Position(**state)))  # an unknown or missing field fails as Position(**state) does


class RNG:
    """Every generator the run draws from (python, numpy, torch CPU and CUDA)."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class Done:
    """A committed period's position: training is over, there is nothing to continue."""

    def state_dict(self) -> str:
        return "done"

    def load_state_dict(self, state: Any) -> None:
        pass


class Trainable:
    """The method's trainable tensors, through the strategy (a gather and a scatter under fsdp)."""

    def __init__(self, strategy: Strategy, method: Method, model: nn.Module) -> None:
        self.strategy, self.method, self.model = strategy, method, model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.strategy.trainable_state(self.method, self.model)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.strategy.load_trainable(self.method, self.model, state)


class Optimizer:
    """The optimizer's state (AdamW's moments), keyed by parameter position as optimizer.state_dict() is."""

    def __init__(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.strategy, self.model, self.optimizer = strategy, model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.optimizer_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_optimizer_state(self.model, self.optimizer, state)


class Checkpointer:
    """Saves and loads the parts of one run's checkpoints: the trainable weights and the method state in
    every checkpoint, and the trainer's parts (optimizer, scheduler, RNG, data position) of a step."""

    def __init__(self, strategy: Strategy, method: Method, model: nn.Module) -> None:
        self.strategy = strategy
        self.model = model
        self.parts: dict[str, Stateful] = {"trainable": Trainable(strategy, method, model), "method": method}

    def step_parts(
        self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, position: Position
    ) -> dict[str, Stateful]:
        """trainer_state.pt's parts of a step checkpoint, in the order they are saved and loaded."""
        return {
            "optimizer": Optimizer(self.strategy, self.model, optimizer),
            "scheduler": scheduler,
            "rng": RNG(),
            "position": position,
        }

    @staticmethod
    def period_parts() -> dict[str, Stateful]:
        """trainer_state.pt's parts of a committed period."""
        return {"rng": RNG(), "position": Done()}

    def snapshot(self, trainer_parts: dict[str, Stateful]) -> dict[str, Any]:
        """Every rank: the state of every part, taken now (the trainable and optimizer parts are
        collectives under fsdp, where rank 0 alone gets the full tensors)."""
        return {
            "trainable": self.parts["trainable"].state_dict(),
            "method": self.parts["method"].state_dict(),
            "trainer": {name: part.state_dict() for name, part in trainer_parts.items()},
        }

    @staticmethod
    def write(directory: Path, snapshot: dict[str, Any]) -> None:
        """Rank 0: a snapshot's three files into `directory` (a staging directory the caller commits)."""
        save_tensors(directory / TRAINABLE_FILE, snapshot["trainable"])
        save_state(directory / METHOD_FILE, snapshot["method"])
        save_state(directory / TRAINER_FILE, snapshot["trainer"])

    def load(self, directory: Path, trainer_parts: dict[str, Stateful] | None = None) -> None:
        """Every rank: the trainable weights and the method state from `directory`, and with `trainer_parts`
        (a step checkpoint's) each of those from trainer_state.pt. Both files are read before the model or
        the method is touched, so a refused file (UnsafeStateError) leaves them as they were."""
        tensors = self.strategy.read_trainable(directory / TRAINABLE_FILE, load_tensors)
        method_state = load_state(directory / METHOD_FILE)
        self.parts["trainable"].load_state_dict(tensors)
        del tensors
        self.parts["method"].load_state_dict(method_state)
        if trainer_parts:
            state = self.strategy.read_trainer_state(directory / TRAINER_FILE, load_state)
            for name, part in trainer_parts.items():
                part.load_state_dict(state[name])


def load_saved_state(method: Method, model: nn.Module, directory: Path) -> None:
    """Load trainable.safetensors and method_state.pt from a period or step checkpoint directory into one
    process's model and method (the eval jobs: landscape, lm-eval, export).

    Never unpickles code (artifacts/state.py): a tampered file raises UnsafeStateError before the
    model or the method is touched.
    """
    Checkpointer(Single(World(), torch.device("cpu")), method, model).load(directory)


def check_free_space(where: Path, k: int, params: list[dict[str, Any]], keep: int) -> None:
    """Refuse to start period k when the disk cannot hold its checkpoints (StorageError, before any step).

    A step checkpoint holds the trainable tensors and AdamW's two moments (3x their bytes); `keep` of
    them stay and one more is in flight before the oldest is pruned, and the period commit adds the
    tensors once more. The estimate ignores the small eval files and counts the method's extra state
    (memory keys, registries) only through its trainable part, so it is a lower bound.
    """
    num_bytes = sum(p.numel() * p.element_size() for g in params for p in g["params"])
    needed = (keep + 1) * 3 * num_bytes + num_bytes
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise StorageError(
            OSError(
                errno.ENOSPC,
                f"not enough free space to start period {k}: its checkpoints "
                f"need about {human_bytes(needed)} (checkpoint.keep={keep}), "
                f"{human_bytes(free)} free",
            ),
            where,
            needed,
        )
