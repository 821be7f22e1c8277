"""TF-IDF slot selection: which of the slots a step read are worth writing, ranked against a background
(the earlier steps, or a fixed set of passages read once: `read_background`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from training.batching import collate, tokenize
from training.methods.base import eval_mode
from training.methods.memory.layer import ProductKeyMemory


def tfidf_top_t(counts: torch.Tensor, doc_freq: torch.Tensor, num_docs: int, top_t: int) -> torch.Tensor:
    """Indices of the top-t read slots by TF-IDF; ties go to the lower index (deterministic).

    tf = counts / sum(counts); idf = log((1 + num_docs) / (1 + doc_freq)) + 1 (smoothed as in
    scikit-learn, so with no background yet the ranking is plain access frequency). doc_freq counts the
    earlier optimizer steps that read a slot: slots every batch reads (function words, formatting) rank
    low, slots specific to this batch's facts rank high. Only slots read in this step are candidates.
    """
    counts = counts.double()
    total = counts.sum()
    if total <= 0:
        return torch.zeros(0, dtype=torch.long, device=counts.device)
    idf = torch.log((1.0 + num_docs) / (1.0 + doc_freq.double())) + 1.0
    score = counts / total * idf
    score[counts <= 0] = -1.0
    num = min(top_t, int((counts > 0).sum()))
    order = torch.sort(-score, stable=True).indices
    return order[:num]


@torch.no_grad()
def read_background(
    model: nn.Module,
    memories: dict[int, ProductKeyMemory],
    tokenizer: Any,
    texts: list[str],
    max_len: int,
    batch_size: int = 16,
) -> tuple[dict[int, torch.Tensor], int]:
    """Document frequencies of every slot over `texts` (one document per text, tokenised as training
    tokenises passages), read by the model as it is now: (per memory layer, how many texts read the
    slot), and the number of texts."""
    device = next(iter(memories.values())).values[0].device
    # the memories add to these in place (ProductKeyMemory.forward), so they hold the counts afterwards
    counts = {i: torch.zeros(mem.num_slots, dtype=torch.long, device=device) for i, mem in memories.items()}
    for i, mem in memories.items():
        mem.seq_counts = counts[i]
    try:
        data = tokenize(tokenizer, texts, max_len)
        with eval_mode(model):
            for start in range(0, len(data.token_ids), batch_size):
                batch = collate(data.token_ids[start : start + batch_size], tokenizer.pad_token_id)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return {i: c.cpu().clone() for i, c in counts.items()}, len(texts)
    finally:
        for mem in memories.values():
            mem.seq_counts = None
