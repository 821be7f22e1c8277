"""How one run's training is spread over its ranks: `train.strategy` (single | ddp | fsdp; auto by default).

Every strategy trains on the same optimizer steps. A step is `train.grad_accum` length-bucketed
micro-batches (the global batch, fixed by the config and the data, never by the world size). Its
micro-batches are dealt round-robin over the ranks: micro-batch i goes to rank i % world_size, in
ceil(grad_accum / world_size) rounds, and the gradients are summed over the ranks after the last round.
So 1, 2 or 8 ranks compute the same sum of the same per-micro-batch gradients (see docs/distributed.md
for the tolerance this leaves); a rank with no micro-batch left in the last round runs a zero-weight
copy of one, because the engines need every rank in every backward.

    single  one process, the plain loop
    ddp     torch.nn.parallel.DistributedDataParallel: replicated weights, gradients all-reduced
            (bucketed, overlapped with the backward of the last round; no_sync in earlier rounds)
    fsdp    torch.distributed.fsdp.fully_shard (FSDP2): weights, gradients and optimizer state sharded
            per decoder layer; for full fine-tuning of models that do not fit one device

The strategy wraps the model for the training forward only. Methods keep the unwrapped model for their
hooks (EWC's penalty, A-GEM's reference pass, LwF's teacher), which is why only the loop calls `forward`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ClassVar

import torch
from torch import nn

from training.distributed import World


class Strategy:
    name: ClassVar[str]
    # Methods that cannot run under this strategy, with the reason printed in the refusal.
    refuses: ClassVar[dict[str, str]] = {}
    # Methods this strategy runs; None = every method not refused.
    only: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, world: World, device: torch.device) -> None:
        self.world = world
        self.device = device

    @classmethod
    def check(cls, method: str, world: World) -> list[str]:
        """Problems with running `method` on this strategy in this world (before anything is loaded)."""
        if cls.only is not None and method not in cls.only:
            return [f"train.strategy {cls.name} runs only {', '.join(cls.only)}, not method {method!r}: "
                    f"its trainable state is small enough to replicate, use train.strategy ddp"]
        if method in cls.refuses:
            return [f"train.strategy {cls.name} cannot run method {method!r}: {cls.refuses[method]}"]
        return []

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training forward goes through this period (after the method chose its trainables)."""
        return model

    def unwrap(self) -> None:
        """End of the period: drop what wrap() built (DDP's gradient hooks are per set of trainables)."""

    def sync(self, wrapped: nn.Module, last_round: bool) -> Any:
        """Context of one round's forward and backward: gradients are reduced only in the last round."""
        return nullcontext()

    @property
    def grad_factor(self) -> float:
        """What each rank's loss is multiplied by so that the engine's reduction gives the sum over ranks."""
        return 1.0


class Single(Strategy):
    name = "single"


class DDP(Strategy):
    name = "ddp"

    def __init__(self, world: World, device: torch.device) -> None:
        super().__init__(world, device)
        self.wrapped: nn.Module | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if not self.world.active:
            return model
        # find_unused_parameters: a method's trainables need not all take part in every step (CASM's
        # router waits for a second period); buffers are never trained, so they are not re-broadcast.
        self.wrapped = DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=True)
        return self.wrapped

    def unwrap(self) -> None:
        self.wrapped = None

    def sync(self, wrapped: nn.Module, last_round: bool) -> Any:
        if last_round or not hasattr(wrapped, "no_sync"):
            return nullcontext()
        return wrapped.no_sync()

    @property
    def grad_factor(self) -> float:
        return float(self.world.size)  # DDP averages over ranks; the loop's weights already divide by the step


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Single, DDP)}


def resolve_strategy(name: str, world: World) -> str:
    """`auto`: single for one process, ddp for several."""
    if name == "auto":
        return "single" if not world.active else "ddp"
    return name


def strategy_problems(name: str, method: str, world: World) -> list[str]:
    resolved = resolve_strategy(name, world)
    if resolved not in STRATEGIES:
        return [f"train.strategy {name!r} is not available; valid: auto, {', '.join(STRATEGIES)}"]
    if resolved == "single" and world.active:
        return [f"train.strategy single runs one process, but the launcher started {world.size} ranks; "
                f"valid with {world.size} ranks: auto, {', '.join(n for n in STRATEGIES if n != 'single')}"]
    return STRATEGIES[resolved].check(method, world)


@contextmanager
def micro_rng(seed: int) -> Iterator[None]:
    """The forward of one micro-batch draws its random numbers (dropout) from its own seed, so which rank
    runs it, and after which other micro-batches, changes nothing; the global generators are untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
