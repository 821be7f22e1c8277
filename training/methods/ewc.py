"""Elastic weight consolidation (Kirkpatrick et al. 2017, https://arxiv.org/abs/1612.00796) and its
online variant (Schwarz et al. 2018, "Progress & Compress", https://arxiv.org/abs/1805.06370).

What trains is `on: lora` (the adapter, default) or `on: full` (every weight), as for every Adapted
method; the penalty is on exactly those parameters theta:

    extra_loss = (lam / 2) * sum_t sum_i F_t,i * (theta_i - theta*_t,i)^2

F_t is the empirical Fisher diagonal of period t, estimated at the period's end on `fisher_samples` of
its training items (a deterministic sample; all of them if fewer), one item at a time:

    F_i = mean over items x of (d NLL(x) / d theta_i)^2,   NLL(x) = mean token NLL of x's trained tokens

(the prompt tokens of a supervised item are masked exactly as in training), and theta*_t the trainable
parameters at the end of period t. Classic EWC keeps one (F_t, theta*_t) pair per past period; online
EWC keeps one running F <- gamma * F + F_new and the latest anchor only.

The Fisher is used as estimated: nothing is normalised. Its scale is set by the model, so `lam` is too;
the default suits a LoRA adapter of a ~100M-parameter LM (docs/methods/ewc.md: how it was chosen, and the
Fisher statistics every period reports in eval_extras so a different model can be re-scaled).

Method state (state_dict): the Fisher diagonals and anchors as fp32 / parameter-dtype tensors keyed by
parameter name, one pair per stored period (classic) or one pair (online), plus the period names.

Device memory: the penalty reads every pair at every step, so the Fisher diagonals and anchors stay next
to the parameters: per pair 4 bytes (Fisher) + the parameter's own bytes (anchor) per trainable weight,
one pair per past period in classic EWC, one in all for online EWC (the choice for `on: full` on a GPU:
an 8B model in bf16 holds 48 GB per pair). What is read only at a period's end (the Fisher's statistics)
is computed on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from torch import nn

from data.fields import Range
from data.schema import Period, Probe
from training.batching import PeriodData, collate
from training.methods.adapted import Adapted, AdaptedOptions
from training.methods.base import MethodContext
from training.seeding import derive_seed


@dataclass
class EWCOptions(AdaptedOptions):
    # penalty strength lambda; the Fisher is not normalised, so this carries its scale (docs/methods/ewc.md)
    lam: Annotated[float, Range(0, 1e15)] = 1e5
    online: bool = False  # one running Fisher and the latest anchor (Schwarz et al. 2018) instead of one per period
    gamma: Annotated[float, Range(0, 1)] = 1.0  # online decay: F <- gamma * F + F_new
    fisher_samples: Annotated[int, Range(1, 10_000_000)] = 64  # items per period the Fisher is estimated on


def trainable_named(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fisher_sample(n: int, k: int, seed: int, period: Period) -> list[int]:
    """Indices of the items the Fisher is estimated on: k of n without replacement (all if n <= k),
    ascending, a pure function of (seed, period)."""
    if n <= k:
        return list(range(n))
    rng = np.random.default_rng(derive_seed(seed, "ewc", "fisher", period.index, period.name))
    return sorted(int(i) for i in rng.choice(n, size=k, replace=False))


def empirical_fisher(
    model: nn.Module, data: PeriodData, indices: Sequence[int], pad_id: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], int]:
    """Diagonal empirical Fisher of the trainable parameters: the mean over items of the squared gradient
    of each item's own mean token NLL (one item per backward). Returns (Fisher by name, items used);
    an item with no trained token (cannot happen for tokenised data) is skipped.

    The model is run in eval mode (no dropout: the estimate is deterministic); every module's mode and
    every parameter's .grad are as they were when it returns."""
    params = trainable_named(model)
    saved_grads = {n: p.grad for n, p in params.items()}
    modes = [(m, m.training) for m in model.modules()]
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    used = 0
    try:
        for p in params.values():
            p.grad = None
        model.eval()
        with torch.enable_grad():
            for i in indices:
                masked = [data.num_masked[i]] if data.num_masked else None
                batch = collate([data.token_ids[i]], pad_id, masked)
                if not bool((batch["labels"][:, 1:] != -100).any()):
                    continue
                out = model(**{k: v.to(device) for k, v in batch.items()})
                out.loss.backward()
                for n, p in params.items():
                    if p.grad is not None:
                        fisher[n] += p.grad.detach().float().pow(2)
                        p.grad = None
                used += 1
    finally:
        for n, p in params.items():
            p.grad = saved_grads[n]
        for m, training in modes:
            m.training = training
    if used:
        for f in fisher.values():
            f.div_(used)
    return fisher, used


def fisher_stats(fisher: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum, mean and max of a Fisher diagonal, over every parameter's entries.

    Read once per period, so computed on the host: one flat fp32 copy of the Fisher on the GPU would be
    the size of the whole trainable model (4 bytes a weight under `on: full`) for three numbers."""
    flat = torch.cat([f.detach().flatten().cpu() for f in fisher.values()]) if fisher else torch.zeros(1)
    return {"sum": float(flat.sum()), "mean": float(flat.mean()), "max": float(flat.max())}


def ewc_penalty(
    params: Mapping[str, torch.Tensor],
    fishers: Sequence[dict[str, torch.Tensor]],
    anchors: Sequence[dict[str, torch.Tensor]],
    lam: float,
) -> torch.Tensor:
    """(lam / 2) * sum over pairs and parameters of F * (theta - theta*)^2, in fp32."""
    total: torch.Tensor | None = None
    for fisher, anchor in zip(fishers, anchors):
        for n, f in fisher.items():
            term = (f * (params[n].float() - anchor[n].float()).pow(2)).sum()
            total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return 0.5 * lam * total


class EWC(Adapted):
    """EWC / online EWC penalty on what `on` trains (LoRA adapter by default)."""

    name = "ewc"
    config_cls = EWCOptions

    def __init__(self, cfg: EWCOptions, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []
        self.periods: list[list[str]] = []  # the period(s) each pair stands for (online: all folded in)
        self.fisher_info: list[dict[str, Any]] = []  # per period: items used and Fisher statistics
        self.last_penalty = 0.0

    # -- training ---------------------------------------------------------------------------
    def _on_device(self, params: dict[str, nn.Parameter]) -> None:
        """Move loaded (CPU) state next to the parameters once; the state stays the same values."""
        for store in (self.fishers, self.anchors):
            for d in store:
                for n, t in d.items():
                    if n not in params:
                        raise RuntimeError(f"ewc: stored state names {n!r}, which is not a trainable parameter")
                    if t.device != params[n].device:
                        d[n] = t.to(params[n].device)

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        if not self.fishers or self.cfg.lam == 0:
            self.last_penalty = 0.0
            return None
        params = trainable_named(model)
        self._on_device(params)
        penalty = ewc_penalty(params, self.fishers, self.anchors, self.cfg.lam)
        self.last_penalty = float(penalty.detach())
        return penalty

    def step_stats(self) -> dict[str, float]:
        return {"ewc_penalty": self.last_penalty}

    def on_period_end(self, model: nn.Module, period: Period, data: PeriodData) -> None:
        params = trainable_named(model)
        indices = fisher_sample(len(data.token_ids), self.cfg.fisher_samples, self.ctx.seed, period)
        fisher, used = empirical_fisher(model, data, indices, self.ctx.tokenizer.pad_token_id, self.ctx.device)
        anchor = {n: p.detach().clone() for n, p in params.items()}
        self.fisher_info.append({"period": period.name, "items": used, **fisher_stats(fisher)})
        if self.cfg.online and self.fishers:
            self._on_device(params)
            old = self.fishers[0]
            self.fishers = [{n: self.cfg.gamma * old[n] + f for n, f in fisher.items()}]
            self.anchors = [anchor]
            self.periods = [[*self.periods[0], period.name]]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)
            self.periods.append([period.name])

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        if not self.fisher_info:
            return {}
        numel = sum(t.numel() for d in self.fishers for t in d.values())
        return {
            "ewc_fisher": [dict(x) for x in self.fisher_info],
            "ewc_pairs": len(self.fishers),
            "ewc_state_numel": 2 * numel,
        }

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "fishers": [{n: t.detach().cpu() for n, t in d.items()} for d in self.fishers],
            "anchors": [{n: t.detach().cpu() for n, t in d.items()} for d in self.anchors],
            "periods": [list(p) for p in self.periods],
            "fisher_info": [dict(x) for x in self.fisher_info],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fishers, anchors = list(state["fishers"]), list(state["anchors"])
        if len(fishers) != len(anchors) or len(fishers) != len(state["periods"]):
            raise RuntimeError("ewc: method state has unequal numbers of Fisher diagonals, anchors and periods")
        if self.cfg.online and len(fishers) > 1:
            raise RuntimeError(f"ewc: online mode keeps one Fisher, the state has {len(fishers)}")
        for f, a in zip(fishers, anchors):
            if set(f) != set(a):
                raise RuntimeError("ewc: a Fisher diagonal and its anchor name different parameters")
        self.fishers = [dict(d) for d in fishers]
        self.anchors = [dict(d) for d in anchors]
        self.periods = [list(p) for p in state["periods"]]
        self.fisher_info = [dict(x) for x in state.get("fisher_info", [])]
        self.last_penalty = 0.0
