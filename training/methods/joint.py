"""Joint (multi-task) training on every period's data so far: an UPPER BOUND, not a continual method.

It breaks the continual-learning constraint on purpose: period k trains on the items of periods
1..k together (all of them, every epoch), so nothing is forgotten for lack of data and the gap between a
method and this row is what sequential training costs. Report it as a bound, never rank it with the
methods (`is_bound = True`; the reports label it).

What trains is `on: lora` (default) or `on: full`, as for every Adapted method, and it continues from
the previous period's state (one adapter across periods, the optimizer fresh each period as for every
method), so the row-k model has seen periods 1..k-1 more often than period k; docs/methods/joint.md
says why that is the bound the score matrix needs. The earlier items keep their own period's loss mask
(training/workload.py). Cost: period k trains on the sum of all periods' items so far.

Method state: every earlier period's items (texts) with the index and name of their period.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from data.schema import Period, Probe
from training.batching import PeriodData
from training.methods.adapted import Adapted
from training.methods.base import MethodContext


class Joint(Adapted):
    """Upper bound: trains each period on the items of every period so far."""

    name = "joint"
    is_bound: ClassVar[bool] = True  # a reference row, not a continual-learning method

    def __init__(self, cfg: Any, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.texts: list[str] = []  # every earlier period's own items, in period order
        self.origin: list[int] = []  # index of the period each text came from
        self.period_names: dict[int, str] = {}
        self._own: tuple[int, list[str]] | None = None  # transient, as in replay.py

    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        self._own = (period.index, list(texts))
        earlier = [t for t, k in zip(self.texts, self.origin) if k != period.index]
        return earlier + list(texts)

    def on_period_end(self, model: nn.Module, period: Period, data: PeriodData) -> None:
        if self._own is None or self._own[0] != period.index:
            raise RuntimeError(f"joint: on_period_end for {period.name} without its on_period_start")
        own = self._own[1]
        if own and list(data.texts[-len(own) :]) != own:
            raise RuntimeError(f"joint: the tokenised data of {period.name} does not end with its own items")
        self.texts += own
        self.origin += [period.index] * len(own)
        self.period_names[period.index] = period.name
        self._own = None

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        return {
            "joint_items": len(self.texts),
            "joint_items_per_period": {self.period_names[k]: self.origin.count(k) for k in sorted(self.period_names)},
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "texts": list(self.texts),
            "origin": list(self.origin),
            "period_names": {str(k): v for k, v in sorted(self.period_names.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        texts, origin = list(state["texts"]), [int(k) for k in state["origin"]]
        if len(texts) != len(origin) or not all(isinstance(t, str) for t in texts):
            raise RuntimeError("joint: the items in the method state are not a list of texts with their periods")
        self.texts, self.origin = texts, origin
        self.period_names = {int(k): str(v) for k, v in state["period_names"].items()}
