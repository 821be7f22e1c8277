"""What a continual-learning regulariser trains: a LoRA adapter (the default) or every weight.

EWC, replay, LwF, A-GEM and the joint bound are rules about *how* to train, on top of *what* trains.
Their options extend LoRA's with `on: lora | full`, and the class delegates preparing the model and
choosing its parameters to the LoRA or full fine-tuning method, so each of them is compared with
sequential LoRA (or full fine-tuning) under exactly the same parameterisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from training.methods.base import Method, MethodContext, trainable_groups
from training.methods.full_ft import FullFineTune
from training.methods.lora import LoRA, LoraOptions, check_targets

PARAMETERISATIONS: dict[str, type[Method]] = {"lora": LoRA, "full": FullFineTune}


@dataclass
class AdaptedOptions(LoraOptions):
    # what trains: a LoRA adapter with the options above, or every weight (full fine-tuning)
    on: Literal["lora", "full"] = "lora"


class Adapted(Method):
    """A method that trains what `cfg.on` says; subclasses add their own hooks and call super()."""

    config_cls = AdaptedOptions
    # ewc's penalty reads the weights only (its Fisher comes from its own per-item forwards at the
    # period's end); replay and joint only choose the items; agem projects the step's summed gradient
    # (equal packed or not) against one of its own unpacked forward; lwf's teacher runs on the same
    # packed inputs as the student (model_inputs), so its KL covers the same positions
    packs = True

    def __init__(self, cfg: Any, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.base = PARAMETERISATIONS[cfg.on](cfg, ctx)

    @classmethod
    def check(cls, cfg: Any, model: nn.Module) -> list[str]:
        # LoRA's check, naming this method's own section (method.ewc.target_modules, not method.lora...)
        return check_targets(cls.name, cfg, model) if cfg.on == "lora" else []

    @classmethod
    def trains_backbone(cls, cfg: Any) -> bool:
        return PARAMETERISATIONS[cfg.on].trains_backbone(cfg)

    def prepare(self, model: nn.Module) -> nn.Module:
        return self.base.prepare(model)

    def trainable_parameters(self, model: nn.Module) -> list[dict[str, Any]]:
        return trainable_groups(model, self.cfg.lr)
