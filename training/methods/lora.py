"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) through peft.

    h = W x + (alpha / r) * B A x,   A: r x d_in (random), B: d_out x r (zeros)

The backbone is frozen; only A and B train, so a period checkpoint is the adapter (a few MB), never
the backbone. B starts at zero, so the prepared model computes exactly what the base model does and
row 0 of the score matrix is the base model. One adapter is trained continually across periods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from peft import LoraConfig, get_peft_model
from torch import nn

from data.fields import Items, Name, Range
from training.methods.base import Method, trainable_groups


@dataclass
class LoraOptions:
    r: Annotated[int, Range(1, 4096)] = 8  # adapter rank
    alpha: Annotated[float, Range(0, 1e6, lo_open=True)] = 16.0  # scaling numerator: the update is scaled by alpha / r
    dropout: Annotated[float, Range(0, 1, hi_open=True)] = 0.0  # dropout on the adapter input
    target_modules: Annotated[list[str], Items(1, 64, Name())] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # module names (suffixes) that get an adapter
    lr: Annotated[float, Range(0, 100)] = 0.0  # learning rate for the adapter; 0 = train.lr


def check_targets(method: str, cfg: LoraOptions, model: nn.Module) -> list[str]:
    """The target modules this model does not have, as one problem naming `method.<method>.target_modules`."""
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        return [
            (
                f"method.{method}.target_modules {missing} are not modules of this model; "
                f"candidates: {sorted(m for m in present if m.endswith('proj'))}"
            )
        ]
    return []


class LoRA(Method):
    name = "lora"
    config_cls = LoraOptions
    packs = True  # the LM loss alone (with dropout > 0 the masks are drawn over another layout, same law)

    @classmethod
    def check(cls, cfg: LoraOptions, model: nn.Module) -> list[str]:
        return check_targets(cls.name, cfg, model)

    def prepare(self, model: nn.Module) -> nn.Module:
        peft_cfg = LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=list(self.cfg.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, peft_cfg)

    def trainable_parameters(self, model: nn.Module) -> list[dict]:
        return trainable_groups(model, self.cfg.lr)
