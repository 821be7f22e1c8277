"""O-LoRA: orthogonal subspace learning (Wang et al. 2023, "Orthogonal Subspace Learning for Language Model
Continual Learning", https://arxiv.org/abs/2310.14152; code: github.com/cmnfriend/O-LoRA).

Each period trains a new LoRA adapter while the adapters of earlier periods stay frozen and active (their
updates are summed into the output). A penalty pushes the new adapter's input subspace (the rows of its A)
away from the earlier ones', so the new update reads directions of the input the old updates ignore, and
interferes less with what they learnt:

    h        = W x + sum_{j <= k} (alpha / r) * B_j A_j x              (A_j: r x d_in, B_j: d_out x r)
    L_ortho  = sum over LoRA modules, over j < k of  sum_{a,b} |(A_j A_k^T)_{ab}|
    L_l2     = sum over LoRA modules of  ||A_k||_F + ||B_k||_F          (norms, not squared, as in their code)
    loss     = LM loss + ortho_weight * L_ortho + l2_weight * L_l2

Hooks: prepare (peft model with period 1's adapter), on_period_start (add period k's adapter, activate
1..k, train only k; idempotent), extra_loss (the two penalties), step_stats (their unweighted values),
trainable_state_dict / load_trainable_state_dict (every adapter; a missing one is created first).
Options: LoRA's (r, alpha, dropout, target_modules, lr) plus ortho_weight (their lamda_1 = 0.5) and
l2_weight (their lamda_2 = 0). Details and measured penalty scales: docs/methods/olora.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn

from data.fields import Range
from training.methods import adapters
from training.methods.base import MethodContext
from training.methods.lora import LoraOptions


@dataclass
class OLoraOptions(LoraOptions):
    ortho_weight: Annotated[float, Range(0, 1e6)] = 0.5  # weight of the orthogonality penalty (O-LoRA's lamda_1)
    l2_weight: Annotated[float, Range(0, 1e6)] = 0.0  # weight of the new adapter's L2 norm (O-LoRA's lamda_2)


def orthogonality_loss(old: list[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """sum_j sum |A_j A_new^T| for one module: A_j (r_j x d) earlier adapters' A, A_new (r x d)."""
    total = new.new_zeros(())
    for a in old:
        total = total + torch.abs(a @ new.T).sum()
    return total


class OLoRA(adapters.PerPeriodAdapters):
    name = "olora"
    config_cls = OLoraOptions

    def __init__(self, cfg: OLoraOptions, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.stats: dict[str, float] = {}

    def _sync(self, model: nn.Module) -> None:
        """Every adapter active; only the current period's trains."""
        adapters.activate(model, adapters.adapters(model), self.current or None)

    def penalties(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_ortho, L_l2) of the current adapter, summed over the LoRA modules in module order."""
        new = adapters.adapter_name(self.current)
        earlier = [adapters.adapter_name(k) for k in adapters.adapters(model) if k < self.current]
        ortho, l2 = [], []
        for layer in adapters.lora_layers(model):
            a_new, b_new = adapters.lora_pair(layer, new)
            ortho.append(orthogonality_loss([adapters.lora_pair(layer, j)[0] for j in earlier], a_new))
            l2.append(torch.linalg.norm(a_new) + torch.linalg.norm(b_new))
        return torch.stack(ortho).sum(), torch.stack(l2).sum()

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        if not self.current:
            return None
        ortho, l2 = self.penalties(model)
        # Logged unweighted, next to the LM loss: the penalty's scale is the thing to watch (O-LoRA's users
        # found it thousands of times the LM loss; docs/methods/olora.md has what we measured).
        self.stats = {"olora_ortho": float(ortho.detach()), "olora_l2": float(l2.detach())}
        extra = None
        # A zero weight adds nothing, not even a zero gradient, so olora with both weights 0 trains as
        # plain per-period adapters.
        if self.cfg.ortho_weight:
            extra = self.cfg.ortho_weight * ortho
        if self.cfg.l2_weight:
            extra = self.cfg.l2_weight * l2 if extra is None else extra + self.cfg.l2_weight * l2
        return extra

    def step_stats(self) -> dict[str, float]:
        return dict(self.stats)

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        adapters.load_adapter_state(model, self.cfg, state, self.name, self._seed)
        self._sync(model)
