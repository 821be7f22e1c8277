"""Length-bucketed micro-batches under a token budget.

Passages are short and of similar length, so grouping sequences of near-equal length into a batch
wastes almost nothing on padding (the padding share is logged) while keeping documents apart: no
cross-document attention, which plain concatenation-packing would introduce without varlen kernels.

The order is a pure function of (seed, period index, epoch), so a resumed period rebuilds exactly the
same batches and only has to remember its position (epoch, micro-batch index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# How many batches' worth of sequences are sorted together: large enough to bucket lengths well, small
# enough that the order stays shuffled across the period.
_BUCKET_SPAN = 32


@dataclass
class PeriodData:
    texts: list[str]
    token_ids: list[list[int]]

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


def tokenize(tokenizer, texts: list[str], max_len: int) -> PeriodData:
    """Tokenise passages for causal LM training, each ending in EOS so the model learns to stop."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = [(list(e) + [eos])[:max_len] for e in encoded]
    return PeriodData(texts=list(texts), token_ids=ids)


def epoch_batches(lengths: list[int], max_tokens: int, max_batch_size: int, seed: int, period: int,
                  epoch: int) -> list[list[int]]:
    """Indices of each micro-batch for one epoch; deterministic in (seed, period, epoch)."""
    rng = np.random.default_rng([seed, period, epoch])
    order = rng.permutation(len(lengths))
    span = max(1, max_batch_size * _BUCKET_SPAN)
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span].tolist(), key=lambda i: (lengths[i], i))
        current: list[int] = []
        longest = 0
        for i in chunk:
            longest_if_added = max(longest, lengths[i])
            if current and (longest_if_added * (len(current) + 1) > max_tokens or len(current) >= max_batch_size):
                batches.append(current)
                current, longest_if_added = [], lengths[i]
            current.append(i)
            longest = longest_if_added
        if current:
            batches.append(current)
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


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


def collate(token_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding)."""
    input_ids, attention = pad(token_ids, pad_id)
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
