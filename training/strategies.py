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

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from training.distributed import World
from training.methods.base import Method


class Strategy:
    name: ClassVar[str]
    # which methods a strategy runs is declared by the methods (Method.strategies) and checked with
    # their other capabilities (training.methods.capability_problems)

    def __init__(self, world: World, device: torch.device, precision: str = "none") -> None:
        self.world = world
        self.device = device
        self.precision = precision  # train.mixed_precision as resolved (training/models.py resolve_precision)

    @classmethod
    def check_optimizer(cls, optimizer: str) -> list[str]:
        return []

    def prepare(self, model: nn.Module) -> None:
        """Once, before the base evaluation: what the strategy does to the model for the whole run."""

    def wrap(self, model: nn.Module, method: Method) -> nn.Module:
        """The module the training forward goes through this period (after the method chose its trainables)."""
        return model

    # -- state: how the checkpointer's parts (training/checkpointer.py) are gathered and spread over the
    # ranks. Every rank calls these (they may be collectives); the files hold full, unsharded tensors, so a
    # checkpoint reads back on any world size and any strategy
    def trainable_state(self, method: Method, model: nn.Module) -> dict[str, torch.Tensor]:
        return method.trainable_state_dict(model)

    def read_trainable(self, path: Path, reader: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The trainable tensors' file as this rank needs it: here every rank reads it."""
        return reader(path)

    def load_trainable(self, method: Method, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        method.load_trainable_state_dict(model, tensors)

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def read_trainer_state(self, path: Path, reader: Callable[[Path], Any]) -> dict[str, Any]:
        """trainer_state.pt of a step checkpoint (optimizer, scheduler, RNG, position), on every rank."""
        return reader(path)

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        optimizer.load_state_dict(state)

    def eval_shard(self) -> Any:
        """How evaluation is shared (eval_and_metrics/shard.py): by default each rank scores its batches."""
        return self.world

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

    def wrap(self, model: nn.Module, method: Method) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        if not self.world.active:
            return model
        # A method whose trainables need not all take part in a step (CASM's router waits for a second
        # period) says so; for the others DDP skips the extra graph traversal (and its warning). Buffers are
        # never trained, so they are not re-broadcast.
        # A new wrapper every period (its gradient hooks belong to that period's trainables); the loop drops
        # the old one at the period's end.
        return DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=method.leaves_parameters_unused,
        )

    def sync(self, wrapped: nn.Module, last_round: bool) -> Any:
        if last_round or not hasattr(wrapped, "no_sync"):
            return nullcontext()
        return wrapped.no_sync()  # type: ignore[operator]  # DistributedDataParallel's (hasattr above)

    @property
    def grad_factor(self) -> float:
        return float(self.world.size)  # DDP averages over ranks; the loop's weights already divide by the step


class Lockstep:
    """Every rank scores every batch, together: FSDP's forward gathers each layer's weights from all ranks,
    so the ranks must run the same forwards (generation lengths included) in the same order."""

    active = True

    def __init__(self, world: World) -> None:
        self.world = world

    def owns(self, index: int) -> bool:
        return True

    def agree(self, flag: bool) -> bool:
        return self.world.any(flag)

    def merge(self, values: list[Any]) -> list[Any]:
        return values


class FSDP(Strategy):
    """FSDP2 (torch.distributed.fsdp.fully_shard) over every decoder layer and the root, for the full
    fine-tuning of models larger than one device. Checkpoints gather the full state to rank 0's host memory
    (torch.distributed.checkpoint.state_dict, full_state_dict + cpu_offload), so they read back on any
    world size or strategy; the price is that rank 0's host must hold the model and AdamW's two moments."""

    name = "fsdp"

    def __init__(self, world: World, device: torch.device, precision: str = "none") -> None:
        super().__init__(world, device, precision)
        self.sharded = False

    @classmethod
    def check_optimizer(cls, optimizer: str) -> list[str]:
        if optimizer != "adamw":
            return [
                (
                    f"train.strategy fsdp runs train.optimizer adamw only (its state is gathered by name), not "
                    f"{optimizer!r}; valid with fsdp: adamw"
                )
            ]
        return []

    def prepare(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if self.sharded:
            return
        # one unit per decoder layer (the classes transformers itself never splits), then the rest. The
        # sharded weights are the float32 master weights (training/models.py master_weights); under bf16
        # FSDP gathers them as bf16 for the forward and backward and reduce-scatters the gradients in
        # float32, so neither the update nor the sum over ranks is rounded to bf16.
        kwargs: dict[str, Any] = {}
        if self.precision == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        self.sharded = True

    def sync(self, wrapped: nn.Module, last_round: bool) -> Any:
        wrapped.set_requires_gradient_sync(last_round)  # type: ignore[operator]
        return nullcontext()

    @property
    def grad_factor(self) -> float:
        return float(self.world.size)  # the reduce-scatter averages over ranks

    def trainable_state(self, method: Method, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        names = [n for n, p in model.named_parameters() if p.requires_grad]
        # a model's state dict holds tensors; torch types its values as any state value
        full = cast(
            dict[str, torch.Tensor],
            get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)),
        )
        return {n: full[n] for n in names if n in full}  # rank 0 holds them all; the others get nothing

    def read_trainable(self, path: Path, reader: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Rank 0 alone reads the full tensors (load_trainable sends each one in turn); every rank keeps only
        its shard, so a node's host holds one copy of the model, not one per rank. A bad file fails every rank."""
        state: dict[str, torch.Tensor] = {}
        with self.world.main_first():
            if self.world.is_main:
                state = reader(path)
        return state

    def load_trainable(self, method: Method, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(
            model,
            dict[str, Any](tensors),
            options=StateDictOptions(full_state_dict=True, strict=False, broadcast_from_rank0=self.world.active),
        )

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # one optimizer, so one dict ({"state": {name: ...}, "param_groups": [...]}), not torch's list of them
        full = cast(
            dict[str, Any],
            get_optimizer_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            ),
        )
        if not full:
            return {}
        # keyed by position, as optimizer.state_dict() is, so a single-process run can resume from it
        index = {n: i for i, n in enumerate(_optimizer_names(model, optimizer))}
        return {
            "state": {index[n]: v for n, v in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]],
        }

    def read_trainer_state(self, path: Path, reader: Callable[[Path], Any]) -> dict[str, Any]:
        """Rank 0 reads the file (AdamW's two moments, twice the model); the others get the small rest from
        it, and their optimizer state from load_optimizer_state's broadcast."""
        state: dict[str, Any] = {}
        with self.world.main_first():
            if self.world.is_main:
                state = reader(path)
        small = self.world.broadcast_object({k: v for k, v in state.items() if k != "optimizer"})
        return state if self.world.is_main else {**small, "optimizer": {}}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        named: dict[str, Any] = {}
        if state:  # rank 0 (or a world of one): positions back to names
            names = _optimizer_names(model, optimizer)
            named = {
                "state": {names[i]: v for i, v in state["state"].items()},
                "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
            }
        set_optimizer_state_dict(
            model,
            optimizer,
            named,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.world.active),
        )

    def eval_shard(self) -> Any:
        return Lockstep(self.world)


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (Single, DDP, FSDP)}


def resolve_strategy(name: str, world: World) -> str:
    """`auto`: single for one process, ddp for several."""
    if name == "auto":
        return "single" if not world.active else "ddp"
    return name


def strategy_problems(train: Any, world: World) -> list[str]:
    """Problems with train.strategy in this world, and with the options it composes with (the method's are
    training.methods.capability_problems')."""
    name = train.strategy
    resolved = resolve_strategy(name, world)
    if resolved not in STRATEGIES:
        return [f"train.strategy {name!r} is not available; valid: auto, {', '.join(STRATEGIES)}"]
    if resolved == "single" and world.active:
        return [
            (
                f"train.strategy single runs one process, but the launcher started {world.size} ranks; "
                f"valid with {world.size} ranks: auto, {', '.join(n for n in STRATEGIES if n != 'single')}"
            )
        ]
    return STRATEGIES[resolved].check_optimizer(train.optimizer)


def total_norm(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a number; under FSDP it is a DTensor that must be gathered first."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


@contextmanager
def micro_rng(seed: int) -> Iterator[None]:
    """The forward of one micro-batch draws its random numbers (dropout) from its own seed, so which rank
    runs it, and after which other micro-batches, changes nothing; the global generators are untouched."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
