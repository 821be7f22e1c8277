"""Length-bucketed micro-batches under a token budget, and (train.pack) the same micro-batches packed.

Passages are short and of similar length, so grouping sequences of near-equal length into a batch
wastes almost nothing on padding (the padding share is logged) while keeping documents apart: no
cross-document attention. With train.pack the items of each micro-batch are laid end to end in a few
rows instead (collate_packed); they stay apart there too, through position ids that restart at every
item, from which transformers builds a block-diagonal causal mask (SDPA, eager) or the variable-length
boundaries of flash-attention.

The order is a pure function of (seed, period index, epoch), so a resumed period rebuilds exactly the
same batches and only has to remember its position (epoch, micro-batch index).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eval_and_metrics.padding import pad, token_batches  # one pad() and one token budget for training, eval and casm

# How many batches' worth of sequences are sorted together: large enough to bucket lengths well, small
# enough that the order stays shuffled across the period.
_BUCKET_SPAN = 32


@dataclass
class PeriodData:
    texts: list[str]
    token_ids: list[list[int]]
    # leading tokens of each sequence that carry no loss (a supervised item's prompt); [] = none anywhere
    num_masked: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


def tokenize(tokenizer, texts: list[str], max_len: int) -> PeriodData:
    """Tokenise passages for causal LM training, each ending in EOS so the model learns to stop."""
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = [(list(e) + [eos])[:max_len] for e in encoded]
    return PeriodData(texts=list(texts), token_ids=ids)


def tokenize_pairs(
    tokenizer, pairs: list[tuple[str, str]], max_len: int, loss_on_prompt: bool | list[bool]
) -> PeriodData:
    """Tokenise (prompt, completion) items: prompt and completion are encoded apart and joined, so the
    boundary is exact and the completion's tokens are those the model is asked to produce after the
    prompt at evaluation. Without loss_on_prompt the prompt's tokens are masked out of the loss.
    Too long an item keeps its EOS, at least half the budget for the completion, and the end of its
    prompt (the part next to the answer), so no sequence is left without a token to learn.
    `loss_on_prompt` may be given per item (a replayed item keeps the setting of its own task)."""
    eos = tokenizer.eos_token_id
    on_prompt = loss_on_prompt if isinstance(loss_on_prompt, list) else [loss_on_prompt] * len(pairs)
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    completions = tokenizer([c for _, c in pairs], add_special_tokens=False)["input_ids"] if pairs else []
    room = max_len - 1
    ids, masked = [], []
    for p, c, keep in zip(prompts, completions, on_prompt):
        c = list(c)[: max(1, room - min(len(p), room // 2))]
        p = list(p)[len(p) - min(len(p), room - len(c)) :]
        ids.append(p + c + [eos])
        masked.append(0 if keep else len(p))
    return PeriodData(texts=[p + c for p, c in pairs], token_ids=ids, num_masked=masked)


def epoch_batches(
    lengths: list[int], max_tokens: int, max_batch_size: int, seed: int, period: int, epoch: int
) -> list[list[int]]:
    """Indices of each micro-batch for one epoch; deterministic in (seed, period, epoch)."""
    rng = np.random.default_rng([seed, period, epoch])
    order = rng.permutation(len(lengths))
    span = max(1, max_batch_size * _BUCKET_SPAN)
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span].tolist(), key=lambda i: (lengths[i], i))
        batches.extend(token_batches(chunk, max_batch_size, lengths, max_tokens))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def collate(token_ids: list[list[int]], pad_id: int, num_masked: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 on padding and on each sequence's first
    num_masked tokens: a prompt the model is given, not asked to produce)."""
    input_ids, attention = pad(token_ids, pad_id)
    labels = input_ids.masked_fill(attention == 0, -100)
    for row, n in enumerate(num_masked or []):
        labels[row, :n] = -100
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """Item positions per row: first-fit decreasing into rows of at most `row_tokens` tokens (an item
    longer than that gets a row of its own). Deterministic: ties keep the items' order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(row_tokens - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def collate_packed(
    token_ids: list[list[int]], pad_id: int, num_masked: list[int] | None = None, row_tokens: int = 0
) -> dict[str, torch.Tensor]:
    """The items of one micro-batch end to end in as few rows of `row_tokens` as first-fit decreasing
    finds (0: one row), each item attending only to itself.

    The model gets input_ids, position_ids (restarting at 0 at every item) and labels, and no
    attention_mask: transformers 5 then reads the item boundaries off the position ids
    (masking_utils.find_packed_sequence_indices) and builds a block-diagonal causal mask for SDPA and
    eager, or cu_seqlens for flash-attention's variable-length kernel. The trailing padding of a short
    row is a segment of its own (positions from 0 again), so no item attends to it.
    Labels are the unpacked ones plus -100 on every item's first token: HF's loss shifts labels by one, so
    the last token of the item before would otherwise be trained to predict it. The trained (position,
    target) pairs are then exactly those of collate(), and the loss's mean over them is the same up to the
    order of the sums. `attention_mask` is returned for counting real tokens, not for the model
    (model_inputs leaves it out)."""
    lengths = [len(t) for t in token_ids]
    rows = pack_rows(lengths, row_tokens or sum(lengths))
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    real = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        col = 0
        for i in row:
            n = lengths[i]
            item = torch.tensor(token_ids[i], dtype=torch.long)
            ids[r, col : col + n] = item
            labels[r, col : col + n] = item
            labels[r, col : col + max(1, num_masked[i] if num_masked else 0)] = -100
            positions[r, col : col + n] = torch.arange(n)
            real[r, col : col + n] = 1
            col += n
        positions[r, col:] = torch.arange(width - col)  # the padding: one more segment, seen by nothing real
    return {"input_ids": ids, "position_ids": positions, "labels": labels, "attention_mask": real}


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What a training forward takes from a collated micro-batch (tensors, and for a packed one a flag).

    A packed micro-batch (it has position_ids) passes no attention_mask and use_cache=False: transformers
    looks for item boundaries in the position ids only when it is given neither a 2D mask nor a KV
    cache, and a Llama in its default config (use_cache=True) makes an empty cache even in a training
    forward. With either, the mask is the plain causal one and the items see each other, with no error
    (tests/test_pack.py breaks it on purpose)."""
    if "position_ids" in batch:
        return {**{k: batch[k] for k in ("input_ids", "position_ids", "labels")}, "use_cache": False}
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
