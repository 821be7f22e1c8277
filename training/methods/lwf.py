"""Learning without Forgetting (Li & Hoiem 2017, https://arxiv.org/abs/1606.09282), for language models.

    loss = LM loss + weight * T^2 * mean_{t in trained positions} KL( softmax(z_old(t) / T) || softmax(z(t) / T) )

LwF keeps a model close to what it was *on the new data*, without storing any old data: the model as it
was at the end of the previous period (the teacher) labels the current period's inputs with its
next-token distributions, and the student pays the KL divergence from those soft targets at every
position the LM loss trains (non-padding, and the completion of a supervised item; position t predicts
token t+1). The temperature T softens both distributions so the teacher's whole ranking of tokens is
transferred, and T^2 keeps the gradient's scale independent of T (Hinton et al. 2015). Period 1 has no
teacher: the term is 0 (extra_loss returns None).

The teacher is the previous period's *trainable* state, never a second backbone: on_period_start
snapshots the trainable tensors (the LoRA adapter by default; every weight with `on: full`), and
extra_loss runs the teacher with `torch.func.functional_call`, which swaps the snapshot in as module
attributes for one forward under no_grad and puts the student's own Parameter objects back. Nothing
is modified in place, so the student graph saved by its forward stays valid (an in-place copy into the
parameters would bump their version counters and break backward) and gradients flow only through the
student logits. The teacher pass runs in eval mode (no dropout) and leaves each module's mode as it was.

Hooks: on_period_start (snapshot the teacher, from period 2 on), extra_loss (teacher pass + KL),
step_stats (`lwf_kl`: the last micro-batch's mean KL at temperature T, before weight and T^2).
State: the snapshot is in state_dict, so any resume (committed period or step checkpoint) restores the
exact teacher whatever the model holds when it is loaded. For the default adapter that is the size of
the adapter; with `on: full` it is a second full copy of the weights in every checkpoint and in device
memory (what a deep-copied teacher would cost too).

Options (`method.lwf.*`, besides the LoRA/`on` options of training/methods/adapted.py): weight (the
paper's lambda_o = 1), temperature (the paper's T = 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from torch import nn

from data.fields import Range
from data.schema import Period
from training.batching import model_inputs
from training.methods.adapted import Adapted, AdaptedOptions
from training.methods.base import eval_mode


@dataclass
class LwfOptions(AdaptedOptions):
    weight: Annotated[float, Range(0, 1e6)] = 1.0  # lambda_o: weight of the distillation term (0 = plain training)
    temperature: Annotated[float, Range(0, 1e3, lo_open=True)] = 2.0  # T: both distributions are softmax(logits / T)


def distillation_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over trained positions of KL(softmax(teacher / T) || softmax(student / T)), in float32.

    Logits are (B, L, V) and labels (B, L) with -100 where no loss is taken (padding, a supervised
    item's prompt); as in the LM loss, position t is trained when labels[t + 1] != -100. Zero when no
    position is trained.
    """
    mask = labels[:, 1:] != -100
    if not bool(mask.any()):
        return student_logits.sum() * 0.0
    s = student_logits[:, :-1][mask].float() / temperature
    t = teacher_logits[:, :-1][mask].float() / temperature
    log_p_teacher = F.log_softmax(t, dim=-1)
    log_p_student = F.log_softmax(s, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean()


class LearningWithoutForgetting(Adapted):
    name = "lwf"
    config_cls = LwfOptions

    def __init__(self, cfg: LwfOptions, ctx: Any) -> None:
        super().__init__(cfg, ctx)
        self.teacher: dict[str, torch.Tensor] | None = None  # trainable tensors at the end of the previous period
        self.last_kl = 0.0
        # (sum of KL, micro-batches) over the current step: the logged KL is the step's mean, summed over the
        # ranks of a distributed run by the loop (step_counters) before it is read
        self.kl_sum = torch.zeros(2, dtype=torch.float64, device=ctx.device)

    def on_period_start(self, model: nn.Module, period: Period, texts: list[str]) -> list[str]:
        # Pure in (model at the end of period k-1, period): the snapshot is exactly that state.
        self.last_kl = 0.0
        self.teacher = None
        if period.index > 1:
            self.teacher = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return texts

    def teacher_logits(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """The previous period's model on this batch: the snapshot swapped in for one no-grad forward."""
        assert self.teacher is not None
        params = dict(model.named_parameters())
        for n, t in self.teacher.items():
            if t.device != params[n].device or t.dtype != params[n].dtype:
                self.teacher[n] = t.to(params[n].device, params[n].dtype)
        # the student's own inputs (packed ones included: the same position ids, items kept apart), no labels
        inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
        with torch.no_grad(), eval_mode(model):
            out = torch.func.functional_call(model, self.teacher, args=(), kwargs=inputs, strict=False)
        return out.logits

    def extra_loss(self, model: nn.Module, batch: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        if self.teacher is None or self.cfg.weight == 0:
            return None
        kl = distillation_kl(outputs.logits, self.teacher_logits(model, batch), batch["labels"], self.cfg.temperature)
        self.kl_sum += torch.stack([kl.detach().double(), kl.new_ones((), dtype=torch.float64)])
        return self.cfg.weight * self.cfg.temperature**2 * kl

    def step_counters(self, model: nn.Module) -> list[torch.Tensor]:
        return [self.kl_sum]

    def step_stats(self) -> dict[str, float]:
        if self.kl_sum[1] > 0:
            self.last_kl = float(self.kl_sum[0] / self.kl_sum[1])
            self.kl_sum.zero_()
        return {"lwf_kl": self.last_kl}

    def state_dict(self) -> dict[str, Any]:
        teacher = None if self.teacher is None else {n: t.detach().cpu() for n, t in self.teacher.items()}
        return {"teacher": teacher, "last_kl": self.last_kl}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        teacher = state.get("teacher")
        self.teacher = None if teacher is None else {n: t.clone() for n, t in teacher.items()}
        self.last_kl = float(state.get("last_kl", 0.0))
