"""The optimizer registry: `train.optimizer` names one of these, for any method.

An optimizer is a choice of update rule, not a continual-learning method, so it lives beside the method
registry rather than in it: each factory takes the method's parameter groups and the train section.
An optimizer may define `stats() -> dict[str, float]`; the loop logs it with every step (CASMO's
confidence trace comes from there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dataclasses

import torch

from training.optimizers.casmo import CASMO


def adamw(params: list[dict[str, Any]], train: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def casmo(params: list[dict[str, Any]], train: Any) -> torch.optim.Optimizer:
    # AdamW's lr, betas and weight decay, so casmo with a calibration window longer than the period is
    # exactly the adamw run; the train.casmo section (training/optimizer_options.py) adds the rest.
    return CASMO(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay,
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


__all__ = ["OPTIMIZERS", "horizon_problem", "optimizer_stats"]
