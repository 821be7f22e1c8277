"""Per-task LoRA: the isolation bound (no paper of its own; the "individual adapter per task" row of
continual-learning tables, e.g. O-LoRA, Wang et al. 2023, https://arxiv.org/abs/2310.14152, Table 1).

A BOUND, not a continual learner: it is told at evaluation time which period an item belongs to, which
no deployable method is. Each period trains a fresh LoRA adapter on that period's data only, with every
other adapter inactive, and each period's eval items are scored with that period's adapter:

    training period k:     h = W x + (alpha / r) * B_k A_k x
    scoring items of s:    h = W x + (alpha / r) * B_s A_s x   if period s is trained, else h = W x

Nothing is shared between periods, so there is no forgetting and no transfer: the diagonal of its score
matrix is what one adapter learns from one period, the upper triangle is the base model, and the lower
triangle repeats the diagonal. Reports must label its rows as a bound.

Hooks: prepare (peft model with period 1's adapter), on_period_start (add period k's adapter, activate
only it; idempotent), on_period_end (period k counts as trained), eval_scope (route a stage's items to
its adapter, or to the base model), trainable_state_dict / load_trainable_state_dict (every adapter; a
missing one is created first), state_dict (how many periods are trained). Options: LoRA's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from data.schema import Period
from training.batching import PeriodData
from training.methods import adapters
from training.methods.base import MethodContext
from training.methods.lora import LoraOptions


class PerTask(adapters.PerPeriodAdapters):
    name = "per_task"
    config_cls = LoraOptions
    is_bound: ClassVar[bool] = True  # an upper/isolation bound: evaluation is told each item's period

    def __init__(self, cfg: LoraOptions, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.num_trained = 0  # periods 1..num_trained have finished training (their adapters score them)
        self.index = {name: k for k, name in enumerate(ctx.period_names, start=1)}

    def _sync(self, model: nn.Module) -> None:
        """The training state: only the current period's adapter is active, and it trains."""
        adapters.activate(model, [self.current or 1], self.current or None)

    def on_period_end(self, model: nn.Module, period: Period, data: PeriodData) -> None:
        self.num_trained = max(self.num_trained, period.index)

    def eval_scope(self, model: nn.Module, stage: str) -> AbstractContextManager[Any]:
        if stage not in self.index:
            raise ValueError(f"per_task: stage {stage!r} is not one of the run's periods {list(self.index)}")
        return self._scope(model, self.index[stage])

    @contextmanager
    def _scope(self, model: nn.Module, k: int) -> Iterator[None]:
        try:
            if k <= self.num_trained:
                adapters.activate(model, [k], None)
                yield
            else:  # not trained yet: the base model, as that period's row-0 entry was
                with model.disable_adapter():  # type: ignore[operator]  # a PeftModel's method
                    yield
        finally:
            self._sync(model)  # peft re-marks adapters trainable on the way out; restore ours

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        adapters.load_adapter_state(model, self.cfg, state, self.name, self._seed)
        # A state loaded without on_period_start (an eval job) leaves the newest adapter active; in a resume
        # on_period_start has set `current` to the newest already (or sets it right after).
        self.current = max([self.current, *adapters.adapters(model)])
        self._sync(model)

    def state_dict(self) -> dict[str, Any]:
        return {"num_trained": self.num_trained}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_trained = int(state["num_trained"])
