"""The sparse updater: after each backward, only the top-t TF-IDF slots of a value table keep their gradient,
and the optimizer is told to move only those rows (`update_rows`, training/optimizers), so Adam's momentum
cannot move a slot the batch did not choose."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from training.methods.memory.layer import ProductKeyMemory
from training.methods.memory.slots import tfidf_top_t
from training.optimizers import UPDATE_ROWS


class SparseSlotUpdater:
    """Per-step TF-IDF selection, gradient mask, and the rows the optimizer may move.

    `bank_of` says which value table of each memory trains now (smf: 0; casm: the current period's).
    """

    def __init__(self, memories: dict[int, ProductKeyMemory], top_t: int, grow_background: bool = True) -> None:
        self.memories = memories
        self.top_t = top_t
        self.grow_background = grow_background  # add every step to the background (else set_background)
        ref = next(iter(memories.values()))
        self.doc_freq = {i: torch.zeros(m.num_slots, dtype=torch.long) for i, m in memories.items()}
        self.num_docs = 0
        self.ever_updated = {i: torch.zeros(ref.num_slots, dtype=torch.bool) for i in memories}
        self.last_selected: dict[int, torch.Tensor] = {}

    def start_recording(self) -> None:
        for mem in self.memories.values():
            if mem.counts is None:
                mem.counts = torch.zeros(mem.num_slots, dtype=torch.long, device=mem.values[0].device)

    def stop_recording(self) -> None:
        for mem in self.memories.values():
            mem.counts = None

    def counters(self) -> list[torch.Tensor]:
        """This step's access counts, one tensor per memory (summed over ranks by the training loop)."""
        return [mem.counts for _, mem in sorted(self.memories.items()) if mem.counts is not None]

    def after_backward(self, bank_of: Callable[[int], int]) -> None:
        """Rank, mask the gradient of every unchosen row, restrict the step to the chosen rows (the
        registry's optimizers honour `update_rows`), update the background."""
        for i, mem in self.memories.items():
            counts = mem.counts.cpu() if mem.counts is not None else torch.zeros(mem.num_slots, dtype=torch.long)
            chosen = tfidf_top_t(counts, self.doc_freq[i], self.num_docs, self.top_t)
            bank = bank_of(i)
            values = mem.values[bank]
            keep = torch.zeros(mem.num_slots, dtype=torch.bool)
            keep[chosen] = True
            keep_dev = keep.to(values.device)
            if values.grad is not None:
                values.grad[~keep_dev] = 0
            setattr(values, UPDATE_ROWS, chosen.to(values.device))
            self.last_selected[i] = chosen
            self.ever_updated[i] |= keep
            if self.grow_background:
                self.doc_freq[i] += (counts > 0).long()
            if mem.counts is not None:
                mem.counts.zero_()
        if self.grow_background:
            self.num_docs += 1

    def set_background(self, doc_freq: dict[int, torch.Tensor], num_docs: int) -> None:
        self.doc_freq = {i: t.clone() for i, t in doc_freq.items()}
        self.num_docs = num_docs

    def state_dict(self) -> dict[str, Any]:
        return {
            "doc_freq": {str(i): t.clone() for i, t in self.doc_freq.items()},
            "num_docs": self.num_docs,
            "ever_updated": {str(i): t.clone() for i, t in self.ever_updated.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.doc_freq = {int(i): t.clone() for i, t in state["doc_freq"].items()}
        self.ever_updated = {int(i): t.clone() for i, t in state["ever_updated"].items()}
        self.num_docs = int(state["num_docs"])
