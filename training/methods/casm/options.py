"""casm's options: smf's memory options plus the router's and the registry's (docs/methods/casm.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from data.fields import Range
from training.methods.memory import MemoryOptions


@dataclass
class CasmOptions(MemoryOptions):
    # decoder layer whose input the router reads (capped at the first memory layer). Early layers keep a
    # date's tokens close to their lexical identity, so routing learnt on training wordings transfers
    # to unseen ones; mid-network states made the router overfit the training templates.
    router_layer: Annotated[int, Range(0, 1023)] = 2
    router_hidden: Annotated[int, Range(1, 65536)] = 64  # hidden width of the router MLP
    router_lr: Annotated[float, Range(0, 100)] = 3e-3  # learning rate of the router
    # weight of the router cross-entropy added to the LM loss
    router_loss_weight: Annotated[float, Range(0, 1e6)] = 1.0
    # Scale of the straight-through term that lets the LM loss reach the router (0 = off). Off by default:
    # with teacher-forced gates it only ever says "the newest bank helped" (no older period is in the
    # batch to disagree), which on SmolLM2 pulled every query to the latest period.
    router_lm_weight: Annotated[float, Range(0, 1e6)] = 0.0
    # stored passages of earlier periods rehearsed by the router per micro-batch
    router_replay: Annotated[int, Range(0, 1_000_000)] = 16
    # passages per period the router rehearses, each re-dated to every period
    router_replay_per_period: Annotated[int, Range(0, 1_000_000)] = 64
    # full-batch steps on the whole rehearsal set at each period end (0 = off)
    router_fit_steps: Annotated[int, Range(0, 1_000_000)] = 200
    router_fit_lr: Annotated[float, Range(0, 100)] = 1e-2  # learning rate of that period-end fit
    skip_restated: bool = True  # drop passages that only restate a fact's active value
    # When a period changes a fact, also train the earlier version's evidence passages rewritten to this
    # period's date and new value (training text alone: the registry's parse), so the new version is
    # reachable from the wordings the old one was stored under (issue 10). On SmolLM2 (2018 -> 2020, one
    # seed) plasticity 0.083 -> 0.333 and ACC 0.098 -> 0.205 at the same forgetting (0.042, smf's);
    # docs/methods/casm.md has the numbers and why part of the gain is the current probes' wording.
    rewrite_evidence: bool = True
    # slot indices recorded per fact version in the registry
    slots_per_version: Annotated[int, Range(1, 4096)] = 8

    def validate(self) -> list[str]:  # type: ignore[override]
        return MemoryOptions.validate(self, "casm")
