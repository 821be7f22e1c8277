"""Experience replay: a small episodic memory of earlier periods' training items, mixed into every later
period's data (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning",
https://arxiv.org/abs/1902.10486; Rolnick et al. 2019, "Experience Replay for Continual Learning",
https://arxiv.org/abs/1811.11682).

What trains is `on: lora` (default) or `on: full`, as for every Adapted method. Replay changes only the
data: the items of period k are trained together with

    n_k = min(|eligible buffer|, round(ratio * |items of period k|))      (Python's round: half to even)

items drawn uniformly without replacement from the buffer (eligible: a buffered text that is not also
one of period k's own items, so every replayed item comes from an earlier period). A replayed item keeps
its own period's loss mask (training/workload.py splits it back into prompt and completion).

The buffer holds at most `buffer_size` items (texts), updated at each period's end with that period's
own items (never with the replayed ones, which are already in it):

    reservoir    reservoir sampling (Vitter's algorithm R) over the stream of all items seen: after n
                 items, each of them is in the buffer with probability min(1, buffer_size / n);
    per_period   an equal quota per period seen: with P periods, period i (0-based, in order) keeps
                 ceil((buffer_size - i) / P) items (quotas differ by at most one, earlier periods get
                 the remainder), a uniform sample of its items; quotas only shrink as periods come, so
                 an earlier period's sample is cut to a prefix of itself (still uniform).

Every random choice uses a numpy generator seeded by derive_seed(run seed, period), so the buffer and
the mixed items are pure functions of the seed and the data so far: a resumed run rebuilds exactly the
same period (on_period_start is called again before the step checkpoint's state is loaded).

Method state: the buffer (texts, each with the index and name of the period it came from) and the
number of items seen, as plain lists and ints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from torch import nn

from data.fields import Range
from data.schema import Period, Probe
from training.batching import PeriodData
from training.methods.adapted import Adapted, AdaptedOptions
from training.methods.base import MethodContext
from training.seeding import derive_seed


@dataclass
class ReplayOptions(AdaptedOptions):
    buffer_size: Annotated[int, Range(1, 100_000_000)] = 200  # most items (texts) the buffer keeps
    policy: Literal["reservoir", "per_period"] = "reservoir"  # which items stay (docstring of replay.py)
    ratio: Annotated[float, Range(0, 1000)] = 0.25  # replayed items mixed in per item of the period


def mix_count(ratio: float, num_texts: int, available: int) -> int:
    return min(available, round(ratio * num_texts))


def per_period_quota(buffer_size: int, num_periods: int, position: int) -> int:
    """Items period `position` (0-based) keeps when `num_periods` share a buffer of `buffer_size`."""
    return max(0, math.ceil((buffer_size - position) / num_periods))


class Replay(Adapted):
    """Experience replay of earlier periods' items from a bounded buffer."""

    name = "replay"
    config_cls = ReplayOptions

    def __init__(self, cfg: ReplayOptions, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.texts: list[str] = []  # the buffer
        self.origin: list[int] = []  # index of the period each buffered text came from
        self.period_names: dict[int, str] = {}  # index -> name of every period seen
        self.num_seen = 0  # items offered to the buffer so far (the reservoir's stream length)
        # this period's own items, recorded by on_period_start for on_period_end (transient: a resumed
        # period calls on_period_start again)
        self._own: tuple[int, list[str]] | None = None

    # -- data -------------------------------------------------------------------------------
    def replayed(self, period: Period, texts: list[str]) -> list[str]:
        """The buffered items mixed into `period` (a pure function of the state, the seed and texts)."""
        own = set(texts)
        eligible = [i for i, t in enumerate(self.texts) if t not in own and self.origin[i] != period.index]
        n = mix_count(self.cfg.ratio, len(texts), len(eligible))
        if n == 0:
            return []
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "replay", "mix", period.index, period.name))
        chosen = sorted(int(i) for i in rng.choice(len(eligible), size=n, replace=False))
        return [self.texts[eligible[i]] for i in chosen]

    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        self._own = (period.index, list(texts))
        return list(texts) + self.replayed(period, texts)

    def on_period_end(self, model: nn.Module, period: Period, data: PeriodData) -> None:
        if self._own is None or self._own[0] != period.index:
            raise RuntimeError(f"replay: on_period_end for {period.name} without its on_period_start")
        own = self._own[1]
        if list(data.texts[: len(own)]) != own:
            raise RuntimeError(f"replay: the tokenised data of {period.name} does not start with its own items")
        self.add(period, own)
        self._own = None

    def add(self, period: Period, texts: list[str]) -> None:
        """Offer a period's own items to the buffer."""
        self.period_names[period.index] = period.name
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "replay", "buffer", period.index, period.name))
        if self.cfg.policy == "reservoir":
            for text in texts:
                if len(self.texts) < self.cfg.buffer_size:
                    self.texts.append(text)
                    self.origin.append(period.index)
                else:
                    j = int(rng.integers(0, self.num_seen + 1))
                    if j < self.cfg.buffer_size:
                        self.texts[j], self.origin[j] = text, period.index
                self.num_seen += 1
            return
        # per_period: cut every earlier period's sample to its new quota, then add this period's
        self.num_seen += len(texts)
        order = sorted(self.period_names)  # every period seen, this one included
        quotas = {k: per_period_quota(self.cfg.buffer_size, len(order), pos) for pos, k in enumerate(order)}
        kept: dict[int, int] = {}
        texts_out, origin_out = [], []
        for t, k in zip(self.texts, self.origin):
            if kept.get(k, 0) < quotas[k]:
                kept[k] = kept.get(k, 0) + 1
                texts_out.append(t)
                origin_out.append(k)
        picked = rng.permutation(len(texts))[: quotas[period.index]]
        texts_out += [texts[int(i)] for i in picked]
        origin_out += [period.index] * len(picked)
        self.texts, self.origin = texts_out, origin_out

    # -- reporting --------------------------------------------------------------------------
    def buffer_report(self) -> dict[str, Any]:
        per_period: dict[str, int] = {}
        for k in sorted(self.period_names):
            per_period[self.period_names[k]] = sum(1 for o in self.origin if o == k)
        return {
            "replay_items": len(self.texts),
            "replay_items_per_period": per_period,
            "replay_bytes": sum(len(t.encode("utf-8")) for t in self.texts),
            "replay_items_seen": self.num_seen,
        }

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        return self.buffer_report()

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "texts": list(self.texts),
            "origin": list(self.origin),
            "period_names": {str(k): v for k, v in sorted(self.period_names.items())},
            "num_seen": self.num_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        texts, origin = list(state["texts"]), [int(k) for k in state["origin"]]
        if len(texts) != len(origin) or not all(isinstance(t, str) for t in texts):
            raise RuntimeError("replay: the buffer in the method state is not a list of texts with their periods")
        self.texts, self.origin = texts, origin
        self.period_names = {int(k): str(v) for k, v in state["period_names"].items()}
        self.num_seen = int(state["num_seen"])
