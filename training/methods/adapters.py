"""One peft LoRA adapter per period, for the methods that keep several (olora, per_task).

    adapter of period k:  "period_<k>"  (k 1-based; a period name may hold characters a module name cannot)
    h = W x + sum over active adapters j of (alpha / r) * B_j A_j x      (in the sorted order of j)

Every adapter is created the same way wherever it is created (prepare for period 1, on_period_start for
a later one, load_trainable_state_dict for one a fresh model lacks): inside a forked RNG, then A drawn
from a local generator seeded by (run seed, method, k) and B set to zero. So an adapter's initial
weights are a pure function of the run seed and k, the global RNG the trainer seeded is never touched,
and the new adapter adds exactly zero to the output until it trains.

peft 0.21's `set_adapter` marks every adapter it activates trainable (and `disable_adapter` re-marks
them on exit), so `activate` sets requires_grad itself afterwards: exactly one adapter (or none) trains.
This is a helper module shared by two methods, not a method of its own: `PerPeriodAdapters` is their
common part (an adapter per period, created and activated as above), each subclass says which
adapters are active while a period trains (`_sync`).
"""

from __future__ import annotations

import math
import re
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from data.schema import Period
from training.methods.base import Method, MethodContext, trainable_groups
from training.methods.lora import LoraOptions, check_targets
from training.seeding import derive_seed

PREFIX = "period_"
# ".lora_A.period_3.weight" (a Linear target) or ".lora_embedding_A.period_3" (an Embedding target, a bare
# Parameter): which adapter a parameter belongs to
_PARAM_RE = re.compile(rf"\.lora_(?:embedding_)?[AB]\.{PREFIX}(\d+)(?:\.|$)")


def adapter_name(k: int) -> str:
    return f"{PREFIX}{k}"


def param_adapter(param_name: str) -> int | None:
    """The period index of the adapter a parameter belongs to; None for the backbone."""
    match = _PARAM_RE.search(param_name)
    return int(match.group(1)) if match else None


def _peft_config(cfg: LoraOptions) -> LoraConfig:
    # peft annotates lora_alpha as int, but takes a float (its scaling is alpha / r)
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """peft's LoRA layers in module order (a fixed order: the loss sums over them in it)."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapters(model: nn.Module) -> list[int]:
    """Period indices of the adapters the model holds, ascending."""
    peft_config: dict[str, Any] = model.peft_config  # type: ignore[assignment]  # a PeftModel's adapter configs
    return sorted(int(n[len(PREFIX) :]) for n in peft_config if n.startswith(PREFIX))


def lora_pair(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of adapter `name` in one layer: A is r x in (a Linear's input, an Embedding's vocabulary)."""
    # peft's ModuleDicts hold Linear layers and its ParameterDicts parameters; nn.Module types them Tensor | Module
    if name in layer.lora_A:
        return cast(torch.Tensor, layer.lora_A[name].weight), cast(torch.Tensor, layer.lora_B[name].weight)
    return cast(torch.Tensor, layer.lora_embedding_A[name]), cast(torch.Tensor, layer.lora_embedding_B[name])


def _init(model: nn.Module, k: int, seed: int) -> None:
    """peft's own LoRA init drawn from a local generator: a Linear target gets kaiming-uniform A and zero B,
    an Embedding target (the synthetic preset adapts embed_tokens) zero A and normal B. Either adds zero."""
    gen = torch.Generator().manual_seed(seed)
    name = adapter_name(k)
    with torch.no_grad():
        for layer in lora_layers(model):
            a, b = lora_pair(layer, name)
            if name in layer.lora_A:
                fresh = torch.empty(a.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)
                a.copy_(fresh)
                b.zero_()
            else:
                a.zero_()
                b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float32))


def attach(model: nn.Module, cfg: LoraOptions, seed: int) -> PeftModel:
    """Wrap the backbone with peft, holding period 1's adapter; the backbone is frozen."""
    with torch.random.fork_rng(devices=[]):
        peft_model = get_peft_model(model, _peft_config(cfg), adapter_name=adapter_name(1))
    _init(peft_model, 1, seed)
    return peft_model


def ensure(model: nn.Module, cfg: LoraOptions, k: int, seed: int) -> bool:
    """Add period k's adapter unless the model holds it already (then nothing changes); True if added."""
    if k in adapters(model):
        return False
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws its init from the global RNG
        model.add_adapter(adapter_name(k), _peft_config(cfg))  # type: ignore[operator]  # a PeftModel's method
    _init(model, k, seed)
    return True


def activate(model: nn.Module, active: list[int], trainable: int | None) -> None:
    """Sum the outputs of the `active` adapters (in ascending order); only `trainable` gets gradients."""
    assert active, "peft needs at least one active adapter; use disable_adapter() for the base model"
    model.base_model.set_adapter([adapter_name(k) for k in sorted(active)])  # type: ignore[union-attr, operator]  # peft's tuner model
    for n, p in model.named_parameters():
        k = param_adapter(n)
        if k is not None:
            p.requires_grad_(k == trainable)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's tensors, frozen ones included (they are not part of the backbone)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if param_adapter(n) is not None}


def load_adapter_state(
    model: nn.Module, cfg: LoraOptions, state: dict[str, torch.Tensor], method: str, seed_of: Any
) -> None:
    """Load `state` (from adapter_state), first creating the adapters it holds that the model lacks.

    `seed_of(k)` gives adapter k's init seed; the init is overwritten here, but creating it the usual
    way keeps the model's module order the same as in a run that created it in on_period_start.
    """
    outside = [n for n in state if param_adapter(n) is None]
    if outside:
        raise RuntimeError(f"{method}: trainable state holds non-adapter tensors {outside[:5]}")
    for k in sorted({k for n in state if (k := param_adapter(n)) is not None}):  # every n is one (checked above)
        ensure(model, cfg, k, seed_of(k))
    params = {n: p for n, p in model.named_parameters() if param_adapter(n) is not None}
    missing = [n for n in params if n not in state]
    unexpected = [n for n in state if n not in params]
    if missing or unexpected:
        raise RuntimeError(f"{method}: trainable state mismatch, missing={missing[:5]} unexpected={unexpected[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def init_seed(run_seed: int, method: str, k: int) -> int:
    return derive_seed(run_seed, method, "adapter", k)


class PerPeriodAdapters(Method):
    """A method with one adapter per period; subclasses define `_sync` (which adapters are active and
    which one trains) and add their own hooks."""

    config_cls = LoraOptions
    packs = True  # olora's penalty reads the adapters' weights only; per_task trains one adapter with the LM loss

    def __init__(self, cfg: LoraOptions, ctx: MethodContext) -> None:
        super().__init__(cfg, ctx)
        self.current = 0  # the period whose adapter trains; 0 before the first period

    @classmethod
    def check(cls, cfg: LoraOptions, model: nn.Module) -> list[str]:
        return check_targets(cls.name, cfg, model)

    def _seed(self, k: int) -> int:
        return init_seed(self.ctx.seed, self.name, k)

    def _sync(self, model: nn.Module) -> None:
        raise NotImplementedError

    def prepare(self, model: nn.Module) -> nn.Module:
        model = attach(model, self.cfg, self._seed(1))
        self._sync(model)
        return model

    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        self.current = period.index
        ensure(model, self.cfg, period.index, self._seed(period.index))
        self._sync(model)
        return texts

    def trainable_parameters(self, model: nn.Module) -> list[dict[str, Any]]:
        return trainable_groups(model, self.cfg.lr)

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return adapter_state(model)
