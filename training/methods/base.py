"""The one interface every continual-learning method implements.

The training loop (training/trainer.py) calls these hooks at fixed points and nowhere else:

    prepare(model)                      once, before the base-model evaluation (row 0)
    on_period_start(model, period, texts) -> texts     data hook: replay adds old passages here
    trainable_parameters(model)         parameter groups handed to AdamW (fresh each period)
    extra_loss(model, batch, outputs)   added to the LM loss (EWC, LwF, routing objectives); `batch` holds
                                        the micro-batch's model inputs (training.batching.model_inputs:
                                        input_ids, attention_mask, labels, and position_ids when packed)
                                        plus the hook inputs the method names in `batch_inputs` (below)
    step_counters(model)                tensors the forward counted this step (memory reads); summed
                                        over the ranks of a distributed run before after_backward
    after_backward(model)               gradient surgery before clipping (A-GEM, sparse masks)
    after_optimizer_step(model)         post-update bookkeeping (re-normalisation, counters)
    step_stats()                        numbers logged with every optimizer step (penalty scales)
    on_period_end(model, period, data)  after the last step, before evaluation (Fisher, buffers); `data`
                                        is the period's tokenised training data (PeriodData)
    eval_scope(model, stage)            context the items of one stage are evaluated in (the per-task
                                        bound evaluates each task with its own adapter)
    eval_extras(model, probes)          method-specific eval numbers (routing accuracy)

Hook inputs beyond the model's own (HOOK_INPUTS; a method receives only those it names in its
`batch_inputs`, so what a method may read of the loop is written in one place):

    TEXTS       batch["texts"]: list[str], the training text of each row of the micro-batch, in row order
                (on_period_start's texts, as tokenised). Rows are sequences only when unpacked, so a
                method that names it cannot declare `packs`
    MICRO_SEED  batch["micro_seed"]: int, the seed the micro-batch's forward draws its random numbers from
                (training.strategies.micro_rng): a function of the micro-batch's place in the run, the
                same on any rank and any number of ranks, unlike a count of the micro-batches one
                process has seen

What a method supports is declared on its class (benchmarks, strategies, gradient_checkpointing, packs,
and per configuration trains_backbone for 4-bit quantisation); training.methods.capability_problems
refuses every other combination in one line each before any run starts.

State is split in two so checkpoints stay small: `trainable_state_dict` (tensors that training changes:
adapters, memory slots; full weights only for full fine-tuning) and `state_dict` (the method's own
bookkeeping: Fisher diagonals, access counts, registries, replay buffers). Both round-trip exactly.

Determinism contract (exact resume): on_period_start must be a pure function of the state at the end of
the previous period and its arguments, because a resumed period calls it again before restoring the
step checkpoint's state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from data.schema import Period, Probe
from training.batching import PeriodData

TEXTS = "texts"
MICRO_SEED = "micro_seed"
HOOK_INPUTS: tuple[str, ...] = (TEXTS, MICRO_SEED)  # what each means: this module's docstring


@dataclass
class MethodContext:
    """What a method may know about the run besides the model."""

    tokenizer: Any
    device: torch.device
    seed: int
    lr: float
    period_names: list[str]


def trainable_groups(model: nn.Module, lr: float = 0.0) -> list[dict[str, Any]]:
    """One AdamW group of every parameter that requires grad; `lr` (when not 0) overrides train.lr."""
    group: dict[str, Any] = {"params": [p for p in model.parameters() if p.requires_grad]}
    if lr:
        group["lr"] = lr
    return [group]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """model.eval() for the duration (no dropout in a teacher or reference pass), then every module's own
    training flag back, so a hook that runs the model inside a training step leaves the step as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


@dataclass
class NoOptions:
    """For methods without options of their own."""


class Method:
    name: ClassVar[str]
    config_cls: ClassVar[type] = NoOptions
    # kinds of benchmark (training/workload.py) the method can run on
    benchmarks: ClassVar[tuple[str, ...]] = ("temporal", "stream")
    # a reference point rather than a method to compare (the joint and per-task bounds); reports label it
    is_bound: ClassVar[bool] = False
    # train.strategy values it runs under (training/strategies.py): fsdp shards full weights, which only a
    # method training the whole backbone needs; every other trainable state is small enough to replicate
    strategies: ClassVar[tuple[str, ...]] = ("single", "ddp")
    # runs under train.gradient_checkpointing: False for a method that counts in the training forward
    # (step_counters), since a forward recomputed by checkpointing would count twice
    gradient_checkpointing: ClassVar[bool] = True
    # trains on packed micro-batches (train.pack) with the loss and gradients of the unpacked ones: the
    # method reads nothing per row or per sequence of the training batch (no per-sequence statistics, no
    # TEXTS lined up with rows), and any forward of its own on the batch goes through
    # training.batching.model_inputs. Opt-in: tests/test_pack.py checks every method that claims it
    packs: ClassVar[bool] = False
    # the hook inputs (HOOK_INPUTS) extra_loss finds in its batch; the loop builds no other
    batch_inputs: ClassVar[frozenset[str]] = frozenset()
    # some trainable parameters may get no gradient in a step (DDP must then look for them)
    leaves_parameters_unused: ClassVar[bool] = False

    def __init__(self, cfg: Any, ctx: MethodContext) -> None:
        self.cfg = cfg
        self.ctx = ctx

    @classmethod
    def hook_inputs(cls, **given: Any) -> dict[str, Any]:
        """Those of the loop's hook inputs (HOOK_INPUTS, given by name) that this method names in
        batch_inputs: the loop adds what this returns to the batch, and nothing else."""
        return {k: v for k, v in given.items() if k in cls.batch_inputs}

    @classmethod
    def check(cls, cfg: Any, model: nn.Module) -> list[str]:
        """Problems with these options for this model (a meta-device skeleton), before any run starts."""
        return []

    @classmethod
    def trains_backbone(cls, cfg: Any) -> bool:
        """Whether these options train the backbone's own weights (which 4-bit quantisation packs and
        freezes): decided per configuration, since a regulariser may train an adapter or every weight."""
        return False

    # -- lifecycle hooks -------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        return texts

    def trainable_parameters(self, model: nn.Module) -> list[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params}]

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        return None

    def step_counters(self, model: nn.Module) -> list[torch.Tensor]:
        """Statistics the training forward accumulates during one optimizer step and after_backward reads.
        Each rank sees only its share of the step's micro-batches, so the loop sums them over the ranks."""
        return []

    def after_backward(self, model: nn.Module) -> None:
        pass

    def after_optimizer_step(self, model: nn.Module) -> None:
        pass

    def step_stats(self) -> dict[str, float]:
        return {}

    def on_period_end(self, model: nn.Module, period: Period, data: PeriodData) -> None:
        pass

    def eval_scope(self, model: nn.Module, stage: str) -> AbstractContextManager[Any] | None:
        """None: this stage's items need no context of their own (and all items share batches)."""
        return None

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        return {}

    # -- state -----------------------------------------------------------------------------
    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unexpected = [n for n in state if n not in params]
        if missing or unexpected:
            raise RuntimeError(
                f"{self.name}: trainable state mismatch, missing={missing[:5]} unexpected={unexpected[:5]}"
            )
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
