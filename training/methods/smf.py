"""Sparse memory finetuning (Lin et al. 2025, "Continual Learning via Sparse Memory Finetuning",
https://arxiv.org/abs/2510.15103), on product-key memory layers (Lample et al. 2019,
https://arxiv.org/abs/1907.05242; Berges et al. 2024, https://arxiv.org/abs/2412.09764).

    h_out = FFN(x) + sum_{i in topk(q(x))} softmax(s)_i * V[i]        x: the FFN input of a chosen layer

A key-value memory is added as a residual branch next to the FFN of the chosen decoder layers. A token's
query is split in two halves, each scored against `num_keys` sub-keys; the top-k of each half combine into
k^2 candidates whose top-k are read, so `num_keys**2` slots cost two `num_keys`-wide products per token.
Values start at zero, so the prepared model computes exactly what the base model does. The backbone is
frozen. After each backward pass the slots the batch read are ranked by TF-IDF (how often this batch
read a slot, discounted by how many earlier batches read it) and only the top-t slots' value rows keep
their gradient, and the optimizer is told to move only those rows (`update_rows`,
training/optimizers), so Adam's momentum cannot move a slot the batch did not choose. Keys and the
query projection are random and frozen: the paper starts from a pretrained memory, which we do not
have, and a frozen random product-key index is a stable locality-sensitive hash of the hidden state
(training keys would move old facts to new slots).

Hooks: prepare (attach memories, freeze the backbone), trainable_parameters (value tables only),
after_backward (TF-IDF top-t gradient mask and row restriction, background counts), eval_extras
(how many slots were ever written). Checkpoints: trainable_state_dict holds only memory tensors
(keys, query projection, values), state_dict the access statistics.

The memory itself (layer, model surgery, TF-IDF slot selection, sparse updater) is the package
training/methods/memory, shared with casm (training/methods/casm), which gives each period its own value
table over the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from data.schema import Probe
from training.batching import PeriodData
from training.methods.base import Method
from training.methods.memory import (
    MemoryOptions,
    ProductKeyMemory,
    SparseSlotUpdater,
    attach_memories,
    install_mask_hook,
    load_memory_state_dict,
    memory_state_dict,
    read_background,
    value_group,
)

BACKGROUND_MAX_LEN = 512  # tokens of a passage read for the background (passages are one sentence)


@dataclass
class SmfOptions(MemoryOptions):
    # What TF-IDF ranks a step's slots against. "steps": the earlier optimizer steps of this run, one
    # document per step (a fact's own earlier epochs count against it). "passages": the period's
    # training passages, one document per passage, read once at the period start and fixed for the
    # period (the paper ranks against a fixed corpus; we have no pretraining data, docs/methods/smf.md).
    background: Literal["steps", "passages"] = "steps"

    def validate(self) -> list[str]:  # type: ignore[override]
        return MemoryOptions.validate(self, "smf")


class SparseMemoryFinetune(Method):
    name = "smf"
    gradient_checkpointing = False  # counts memory reads in the forward (step_counters)
    # train.pack is refused: TF-IDF counts the sequences (rows) that read a slot, so a packed row would be
    # one document for all its items; prefix_mean queries would average across items; and the memories
    # skip padding through the 2D attention mask, which a packed forward does not pass
    packs = False
    config_cls = SmfOptions

    def __init__(self, cfg: SmfOptions, ctx: Any) -> None:
        super().__init__(cfg, ctx)
        self.memories: dict[int, ProductKeyMemory] = {}
        self.updater: SparseSlotUpdater | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        self.memories = attach_memories(model, self.cfg, num_banks=1, seed=self.ctx.seed, section="smf")
        install_mask_hook(model, self.memories)
        self.updater = SparseSlotUpdater(self.memories, self.cfg.top_t, grow_background=self.cfg.background == "steps")
        return model

    def on_period_start(self, model: nn.Module, period: Any, texts: list[str]) -> list[str]:
        if self.cfg.background == "passages":
            assert self.updater is not None, "prepare() first"
            # a pure function of the model at the period start and the texts, as a resume requires
            self.updater.set_background(
                *read_background(model, self.memories, self.ctx.tokenizer, texts, BACKGROUND_MAX_LEN)
            )
        return texts

    def trainable_parameters(self, model: nn.Module) -> list[dict[str, Any]]:
        assert self.updater is not None, "prepare() first"
        params = [m.values[0] for _, m in sorted(self.memories.items())]
        for p in params:
            p.requires_grad_(True)
        self.updater.start_recording()  # counting starts with the first training forward
        return [value_group(params, self.cfg, self.ctx.lr)]

    def step_counters(self, model: nn.Module) -> list[torch.Tensor]:
        return self.updater.counters() if self.updater is not None else []

    def after_backward(self, model: nn.Module) -> None:
        assert self.updater is not None
        self.updater.after_backward(lambda i: 0)

    def on_period_end(self, model: nn.Module, period: Any, data: PeriodData) -> None:
        assert self.updater is not None
        self.updater.stop_recording()

    def eval_extras(self, model: nn.Module, probes: list[Probe]) -> dict[str, Any]:
        if self.updater is None:
            return {}
        written = sum(int(t.sum()) for t in self.updater.ever_updated.values())
        total = sum(m.num_slots for m in self.memories.values())
        return {"memory_slots_written": written, "memory_slots": total}

    def trainable_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return memory_state_dict(model)

    def load_trainable_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        load_memory_state_dict(model, state, self.name)

    def state_dict(self) -> dict[str, Any]:
        assert self.updater is not None
        return {"access": self.updater.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.updater is not None
        self.updater.load_state_dict(state["access"])
