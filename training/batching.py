"""Length-bucketed micro-batches under a token budget.

Passages are short and of similar length, so grouping sequences of near-equal length into a batch
wastes almost nothing on padding (the padding share is logged) while keeping documents apart: no
cross-document attention, which plain concatenation-packing would introduce without varlen kernels.

The order is a pure function of (seed, period index, epoch), so a resumed period rebuilds exactly the
same batches and only has to remember its position (epoch, micro-batch index).
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def tokenize_pairs(tokenizer, pairs: list[tuple[str, str]], max_len: int,
                   loss_on_prompt: bool | list[bool]) -> PeriodData:
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
        c = list(c)[:max(1, room - min(len(p), room // 2))]
        p = list(p)[len(p) - min(len(p), room - len(c)):]
        ids.append(p + c + [eos])
        masked.append(0 if keep else len(p))
    return PeriodData(texts=[p + c for p, c in pairs], token_ids=ids, num_masked=masked)


def epoch_batches(lengths: list[int], max_tokens: int, max_batch_size: int, seed: int, period: int,
                  epoch: int) -> list[list[int]]:
    """Indices of each micro-batch for one epoch; deterministic in (seed, period, epoch)."""
    rng = np.random.default_rng([seed, period, epoch])
    order = rng.permutation(len(lengths))
    span = max(1, max_batch_size * _BUCKET_SPAN)
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start:start + span].tolist(), key=lambda i: (lengths[i], i))
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
