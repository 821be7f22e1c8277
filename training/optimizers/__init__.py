"""The optimizer registry: `train.optimizer` names one of these, for any method.

An optimizer is a choice of update rule, not a continual-learning method, so it lives beside the method
registry rather than in it: each factory takes the method's parameter groups and the train section.
An optimizer may define `stats() -> dict[str, float]`; the loop logs it with every step (CASMO's
confidence trace comes from there).

A method may mark a parameter group `{"rule": "sgd"}`: every optimizer here then updates that group by
plain SGD (`p -= lr * grad`: no momentum, no weight decay, no state) and runs its own rule on the other
groups. Sparse memory finetuning (training/methods/smf.py) trains its memory value rows this way, as
the paper does; the group still follows the lr schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dataclasses

import torch

from training.optimizers.casmo import CASMO


SGD_RULE = "sgd"  # value of a param group's "rule" key: plain SGD for that group


class SgdGroups:
    """Mixin for a torch optimizer: groups marked {"rule": "sgd"} take a plain SGD step first; their
    gradients are hidden while the base rule runs, so it skips them (and keeps no state for them)."""

    param_groups: list[dict[str, Any]]

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for group in self.param_groups:
                if group.get("rule") != SGD_RULE:
                    continue
                for p in group["params"]:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-group["lr"])
                        hidden.append((p, p.grad))
                        p.grad = None
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            for p, grad in hidden:
                p.grad = grad


class AdamW(SgdGroups, torch.optim.AdamW):
    pass


class Casmo(SgdGroups, CASMO):
    pass


def adamw(params: list[dict[str, Any]], train: Any) -> torch.optim.Optimizer:
    return AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def casmo(params: list[dict[str, Any]], train: Any) -> torch.optim.Optimizer:
    # AdamW's lr, betas and weight decay, so casmo with a calibration window longer than the period is
    # exactly the adamw run; the train.casmo section (training/optimizer_options.py) adds the rest.
    return Casmo(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
                 **dataclasses.asdict(train.casmo))


OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]], Any], torch.optim.Optimizer]] = {
    "adamw": adamw,
    "casmo": casmo,
}


def horizon_problem(optimizer: torch.optim.Optimizer, total_steps: int) -> str | None:
    """An optimizer that needs a number of steps (CASMO's calibration window) says when a period is
    too short for it; the loop prints that once per period, so a run never silently measures AdamW."""
    check = getattr(optimizer, "horizon_problem", None)
    return check(total_steps) if callable(check) else None


def optimizer_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    stats = getattr(optimizer, "stats", None)
    return stats() if callable(stats) else {}


__all__ = ["OPTIMIZERS", "SGD_RULE", "horizon_problem", "optimizer_stats"]
