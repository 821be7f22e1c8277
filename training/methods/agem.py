"""Averaged Gradient Episodic Memory (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM",
https://arxiv.org/abs/1812.00420).

    g_ref = grad of the LM loss on a random batch from the episodic memory
    if g . g_ref < 0:   g <- g - (g . g_ref / g_ref . g_ref) g_ref          (else g unchanged)

GEM forbids a step that increases the loss on any earlier task's stored examples, one constraint per
task, solved as a quadratic program. A-GEM keeps one constraint: the step must not increase the loss on
a random batch of the whole memory, to first order (g . g_ref >= 0). The closest gradient that satisfies
it is the Euclidean projection onto the half-space {x : x . g_ref >= 0}, the closed form above: when g
points against g_ref, its component along g_ref is removed. The memory holds `memory_per_period`
tokenised training items of every finished period (chosen at random at the period's end), so period 1
trains as plain LoRA (or full fine-tuning) and only later periods are constrained.

Hooks: after_backward (reference gradient on the memory, projection over the trainable parameters,
parameter by parameter), on_period_start (period index, step counter), on_period_end (add this period's items),
step_stats (`agem_projected`: 1 when this step was projected, `agem_dot`: g . g_ref before projection),
eval_extras (`agem_memory_items`, `agem_memory_tokens`, `agem_memory_bytes` = tokens as int64).

The reference batch of step s of period k is drawn with a local generator seeded by
derive_seed(seed, "agem", k, s), and s is method state, so a resumed period draws the same batches; the
global RNG is never touched. The reference pass runs in eval mode (no dropout, so it draws no random
numbers either) and restores each module's mode; the step's own gradient is saved and put back around it.

State: the memory as lists of ints (token ids, number of leading prompt tokens without loss, period),
and the step counter. Options (`method.agem.*`, besides the LoRA/`on` options): memory_per_period,
ref_batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from torch import nn

from data.fields import Range
from data.schema import Period, Probe
from training.batching import PeriodData, collate
from training.methods.adapted import Adapted, AdaptedOptions
from training.methods.base import eval_mode
from training.seeding import derive_seed


@dataclass
class AgemOptions(AdaptedOptions):
    memory_per_period: Annotated[int, Range(0, 1 << 20)] = 64  # training items of each finished period kept in memory
    ref_batch: Annotated[int, Range(1, 4096)] = 16  # memory items in each step's reference batch (one forward)


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """The Euclidean projection of g onto {x : x . g_ref >= 0}: g itself when g . g_ref >= 0 (or g_ref = 0)."""
    dot = torch.dot(g, g_ref)
    ref_sq = torch.dot(g_ref, g_ref)
    if dot >= 0 or ref_sq == 0:
        return g
    return g - (dot / ref_sq) * g_ref


def grad_dot(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> torch.Tensor:
    """The dot product of two gradients given per parameter (None = zeros), accumulated in fp32."""
    total = torch.zeros((), dtype=torch.float32)
    for x, y in zip(a, b):
        if x is not None and y is not None:
            total = total.to(x.device) + torch.dot(x.flatten().float(), y.flatten().float())
    return total


class AveragedGEM(Adapted):
    name = "agem"
    config_cls = AgemOptions

    def __init__(self, cfg: AgemOptions, ctx: Any) -> None:
        super().__init__(cfg, ctx)
        # the episodic memory, one entry per item
        self.token_ids: list[list[int]] = []
        self.num_masked: list[int] = []
        self.periods: list[int] = []
        self.period = 0  # index of the period being trained
        self.step = 0  # after_backward calls in this period: seeds the reference batch
        self.last = {"agem_projected": 0.0, "agem_dot": 0.0}

    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        self.period, self.step = period.index, 0
        self.last = {"agem_projected": 0.0, "agem_dot": 0.0}
        return texts

    def reference_batch(self, step: int) -> dict[str, torch.Tensor]:
        """Step `step`'s reference batch: `ref_batch` memory items without replacement, from a local generator."""
        gen = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "agem", self.period, step))
        picked = torch.randperm(len(self.token_ids), generator=gen)[: self.cfg.ref_batch].tolist()
        return collate(
            [self.token_ids[i] for i in picked], self.ctx.tokenizer.pad_token_id, [self.num_masked[i] for i in picked]
        )

    def after_backward(self, model: nn.Module) -> None:
        step, self.step = self.step, self.step + 1
        self.last = {"agem_projected": 0.0, "agem_dot": 0.0}
        if not self.token_ids:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        grads = [p.grad for p in params]  # the step's own gradient, kept as it is (no copy)
        for p in params:
            p.grad = None
        batch = {k: v.to(params[0].device) for k, v in self.reference_batch(step).items()}
        with torch.enable_grad(), eval_mode(model):
            model(**batch).loss.backward()
        refs = [p.grad for p in params]
        # Parameter by parameter: flattening both gradients into fp32 vectors would hold two more
        # model-sized copies (four at bf16) on the GPU; the numbers are the same up to float reordering.
        dot, ref_sq = grad_dot(grads, refs), grad_dot(refs, refs)
        self.last = {"agem_projected": 0.0, "agem_dot": float(dot)}
        if dot >= 0 or ref_sq == 0:  # put the step's own gradient back untouched, bit for bit
            for p, gr in zip(params, grads):
                p.grad = gr
            return
        self.last["agem_projected"] = 1.0
        scale = dot / ref_sq
        for p, gr, ref in zip(params, grads, refs):
            if ref is None:  # g - scale * 0
                p.grad = gr
                continue
            new = (gr.float() if gr is not None else torch.zeros((), device=ref.device)) - scale * ref.float()
            p.grad = new.to(p.dtype) if gr is not None or bool(new.any()) else None

    def step_stats(self) -> dict[str, float]:
        return dict(self.last)

    def on_period_end(self, model: nn.Module, period: Period, data: PeriodData) -> None:
        # Idempotent per period: a resume that redoes this period's end replaces, never duplicates.
        keep = [i for i, k in enumerate(self.periods) if k != period.index]
        self.token_ids = [self.token_ids[i] for i in keep]
        self.num_masked = [self.num_masked[i] for i in keep]
        self.periods = [self.periods[i] for i in keep]
        gen = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "agem", period.index, "memory"))
        picked = sorted(torch.randperm(len(data.token_ids), generator=gen)[: self.cfg.memory_per_period].tolist())
        masked = data.num_masked or [0] * len(data.token_ids)
        self.token_ids += [list(data.token_ids[i]) for i in picked]
        self.num_masked += [int(masked[i]) for i in picked]
        self.periods += [period.index] * len(picked)

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        num_tokens = sum(len(t) for t in self.token_ids)
        return {
            "agem_memory_items": len(self.token_ids),
            "agem_memory_tokens": num_tokens,
            "agem_memory_bytes": 8 * num_tokens,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "token_ids": [list(t) for t in self.token_ids],
            "num_masked": list(self.num_masked),
            "periods": list(self.periods),
            "period": self.period,
            "step": self.step,
            "last": dict(self.last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.token_ids = [list(t) for t in state["token_ids"]]
        self.num_masked = list(state["num_masked"])
        self.periods = list(state["periods"])
        self.period, self.step = int(state["period"]), int(state["step"])
        self.last = dict(state["last"])
