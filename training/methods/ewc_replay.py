"""EWC and experience replay together: the method of the public EWC + replay LoRA pipeline for dialogue
styles (one speaker per phase), as that pipeline meant it and not as it ran.

Each period trains on its own items plus a replayed sample of earlier periods' items (replay.py: the
same buffer, policy and mixing ratio), with the EWC penalty of every earlier period added to the loss
(ewc.py: the same Fisher, anchors and online option). The Fisher of a period is estimated on the data it
was trained on, replayed items included, so the anchor protects what the adapter was asked to keep, and
`fisher_samples` sets the sample (the pipeline used a 10% sample of its replay set:
configs/experiments/ewc-replay-dialogue.yaml sets the count that matches).

What the original got wrong, and how this differs (docs/methods/ewc.md, docs/streams.md):
- its replay buffer was filled but never mixed into training; here the mixed items are counted per
  period in eval_extras (`replay_items_per_period`) and the number of texts trained is in each manifest;
- it reported the EWC penalty as "forgetting"; here forgetting comes from the score matrix (the first
  speaker's held-out perplexity on the states saved after every later phase), and the penalty is only
  logged per step (`ewc_penalty`) as the scale it is.

Options: every option of ewc and of replay (lam, online, gamma, fisher_samples; buffer_size, policy,
ratio) and the adapter's (r, alpha, ..., on). State: {"ewc": EWC's state, "replay": the buffer}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from data.schema import Period, Probe
from training.batching import PeriodData
from training.methods.base import MethodContext
from training.methods.ewc import EWC, EWCOptions
from training.methods.replay import Replay, ReplayOptions


@dataclass
class EWCReplayOptions(ReplayOptions, EWCOptions):
    """The options of both (fields of the adapter first, then EWC's, then replay's)."""


class EWCReplay(EWC):
    """EWC's penalty on top of replay's data: the EWC class with a replay buffer as a component."""

    name = "ewc_replay"
    config_cls = EWCReplayOptions

    def __init__(self, cfg: EWCReplayOptions, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.replay = Replay(cfg, ctx)

    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        return self.replay.on_period_start(model, period, texts)

    def on_period_end(self, model: nn.Module, period: Period, data: PeriodData) -> None:
        super().on_period_end(model, period, data)
        self.replay.on_period_end(model, period, data)

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        return {**super().eval_extras(model, probes), **self.replay.eval_extras(model, probes)}

    def state_dict(self) -> dict[str, Any]:
        return {"ewc": super().state_dict(), "replay": self.replay.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state["ewc"])
        self.replay.load_state_dict(state["replay"])
