"""Padding token sequences into one batch, shared by evaluation (left padding for generation) and
training (right padding; training/batching.py re-exports it). It lives here, below training, so the
scorers, and the report that re-aggregates with them, never import training (the layers flow
data -> eval_and_metrics -> training)."""

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
