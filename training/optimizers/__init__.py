"""The optimizer registry: `train.optimizer` names one of these, for any method.

An optimizer is a choice of update rule, not a continual-learning method, so it lives beside the method
registry rather than in it: each factory takes the method's parameter groups and the train section.
An optimizer may define `stats() -> dict[str, float]`; the loop logs it with every step (CASMO's
confidence trace comes from there).

A method may mark a parameter group `{"rule": "sgd"}`: every optimizer here then updates that group by
plain SGD (`p -= lr * grad`: no momentum, no weight decay, no state) and runs its own rule on the other
groups. Sparse memory finetuning (training/methods/smf.py, its updater in training/methods/memory/sparse.py)
trains its memory value rows this way, as the paper does; the group still follows the lr schedule.

A method may also set `update_rows` on a parameter (a LongTensor of row indices, before the step): every
optimizer here then moves only those rows, and every other row keeps its value bit for bit. The rule's
state (AdamW's moments) still advances on every row, as it would for a gradient that is zero there.
AdamW does this row-restricted (the sparse memories' value tables have 10^4-10^5 rows, of which a step
moves ~10^3: a dense step was most of smf's training time); any other rule takes a dense step and the
other rows are put back. The attribute is consumed by the step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, overload

import torch

from training.optimizers.casmo import CASMO

SGD_RULE = "sgd"  # value of a param group's "rule" key: plain SGD for that group


class SgdGroups:
    """Mixin for a torch optimizer: groups marked {"rule": "sgd"} take a plain SGD step first; their
    gradients are hidden while the base rule runs, so it skips them (and keeps no state for them)."""

    param_groups: list[dict[str, Any]]

    # the overloads of torch.optim.Optimizer.step, so that the mixed-in classes agree with their base
    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

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


UPDATE_ROWS = "update_rows"  # attribute a method sets on a parameter: the only rows this step may move


class RowGroups:
    """Mixin for a torch optimizer: a parameter carrying `update_rows` moves only in those rows.

    `row_step` is the rule's own row-restricted update; where it returns False the parameter takes the
    rule's dense step and the other rows are put back, which is exact for any rule and costs a copy."""

    param_groups: list[dict[str, Any]]

    def row_step(self, group: dict[str, Any], p: torch.Tensor, rows: torch.Tensor) -> bool:
        return False

    # as in SgdGroups: torch.optim.Optimizer.step's overloads
    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        hidden: list[tuple[torch.Tensor, torch.Tensor]] = []
        restore: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    rows = getattr(p, UPDATE_ROWS, None)
                    if rows is None:
                        continue
                    setattr(p, UPDATE_ROWS, None)
                    if p.grad is None:
                        continue
                    if self.row_step(group, p, rows):
                        hidden.append((p, p.grad))
                        p.grad = None
                    else:
                        keep = torch.zeros(p.shape[0], dtype=torch.bool, device=p.device)
                        keep[rows] = True
                        restore.append((p, ~keep, p.detach().clone()))
        try:
            return super().step(closure)  # type: ignore[misc]
        finally:
            with torch.no_grad():
                for p, others, before in restore:
                    p[others] = before[others]
            for p, grad in hidden:
                p.grad = grad


class AdamW(SgdGroups, RowGroups, torch.optim.AdamW):
    def row_step(self, group: dict[str, Any], p: torch.Tensor, rows: torch.Tensor) -> bool:
        """torch's single-tensor AdamW (torch/optim/adam.py) with the parameter update on `rows` only:
        the same state keys and the same operations in the same order, so a row moves exactly as the
        dense step would move it."""
        if group["amsgrad"] or group["maximize"] or group.get("capturable") or group.get("differentiable"):
            return False
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        lr, grad = float(group["lr"]), p.grad
        state["step"] += 1
        step = float(state["step"].item())
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        chosen = p[rows]
        if group["weight_decay"] != 0:
            chosen.mul_(1 - lr * group["weight_decay"])
        step_size = lr / (1 - beta1**step)
        denom = (exp_avg_sq[rows].sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        chosen.addcdiv_(exp_avg[rows], denom, value=-step_size)
        p[rows] = chosen
        return True


class Casmo(SgdGroups, RowGroups, CASMO):
    pass


def adamw(params: list[dict[str, Any]], train: Any) -> torch.optim.Optimizer:
    return AdamW(params, lr=train.lr, betas=tuple(train.betas), weight_decay=train.weight_decay)


def casmo(params: list[dict[str, Any]], train: Any) -> torch.optim.Optimizer:
    # AdamW's lr, betas and weight decay, so casmo with a calibration window longer than the period is
    # exactly the adamw run; the train.casmo section (training/optimizer_options.py) adds the rest.
    return Casmo(
        params,
        lr=train.lr,
        betas=tuple(train.betas),
        weight_decay=train.weight_decay,
        **dataclasses.asdict(train.casmo),
    )


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


__all__ = ["OPTIMIZERS", "SGD_RULE", "UPDATE_ROWS", "horizon_problem", "optimizer_stats"]
