"""Full fine-tuning: every backbone weight is trained; the naive continual-learning baseline.

No hooks beyond the defaults. Its checkpoints are whole models, the one method where that is the
trainable state by definition.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from training.methods.base import Method


class FullFineTune(Method):
    name = "full_ft"
    packs = True  # the LM loss alone: nothing read per row of the batch
    strategies = ("single", "ddp", "fsdp")  # fsdp is for exactly this: full weights that fit no one device

    @classmethod
    def trains_backbone(cls, cfg: Any) -> bool:
        return True

    def prepare(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
