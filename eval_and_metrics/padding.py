"""Padding token sequences into one batch, and batches bounded in padded tokens, shared by evaluation
(left padding for generation) and training (right padding; training/batching.py re-exports pad). It
lives here, below training, so the scorers, and the report that re-aggregates with them, never import
training (the layers flow data -> eval_and_metrics -> training)."""

from __future__ import annotations

import torch


def pad(seqs: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token sequences padded to the longest; left padding for
    generation (every sequence ends in the last column), right padding for training."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[row, cols] = torch.tensor(s, dtype=torch.long)
        mask[row, cols] = 1
    return ids, mask


def token_batches(
    order: list[int], batch_size: int, lengths: list[int] | None = None, max_tokens: int = 0
) -> list[list[int]]:
    """Consecutive runs of `order` of at most `batch_size` items, and (with `lengths` and `max_tokens`)
    at most `max_tokens` padded tokens: items x the longest of them. An item longer than the budget on
    its own is a batch of one; with no token budget the batches are exactly the fixed-size ones."""
    if not lengths or max_tokens <= 0:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        wider = max(longest, lengths[i])
        if current and (len(current) >= batch_size or wider * (len(current) + 1) > max_tokens):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    return batches
