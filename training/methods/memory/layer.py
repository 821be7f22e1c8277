"""The product-key memory layer shared by smf and casm (Lample et al. 2019, https://arxiv.org/abs/1907.05242;
Berges et al. 2024, https://arxiv.org/abs/2412.09764), and its options.

    h_out = FFN(x) + sum_{i in topk(q(x))} softmax(s)_i * V[i]        x: the FFN input of a chosen layer

A token's query is split in two halves, each scored against `num_keys` sub-keys; the top-k of each half
combine into k^2 candidates whose top-k are read, so `num_keys**2` slots cost two `num_keys`-wide products
per token. Values start at zero, so the prepared model computes exactly what the base model does. Keys and
the query projection are random and frozen: a frozen random product-key index is a stable
locality-sensitive hash of the hidden state (docs/methods/smf.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import nn

from data.fields import Items, Range

MEMORY_ATTR = "memory"  # the memory is registered as <layer>.mlp.memory, so backbone names never change


@dataclass
class MemoryOptions:
    """Options of the product-key memory shared by smf and casm."""

    # decoder layers that get a memory branch; [] = 3/4 depth (checked against the model's depth)
    layers: Annotated[list[int], Items(0, 256, Range(0, 1023))] = field(default_factory=list)
    num_keys: Annotated[int, Range(2, 4096)] = 128  # sub-keys per query half; the memory has num_keys**2 slots
    key_dim: Annotated[int, Range(2, 8192)] = 128  # query/key width (split into two halves of key_dim/2)
    top_k: Annotated[int, Range(1, 4096)] = 32  # slots read per token (at most num_keys)
    top_t: Annotated[int, Range(1, 1 << 24)] = 1024  # slots (value rows) updated per optimizer step, chosen by TF-IDF
    # Value rows start at zero and each is written only in the steps that choose it, so they need a far
    # larger step than dense weights. On SmolLM2 at layer 22 (docs/methods/smf.md, "Choosing the layer
    # and the learning rate"), the probes' gold log-prob after one period: lr 4 -> -2.90, 8 -> -3.41
    # (lr 2 with top_k 8: -2.82, so 2-4 is flat); the former 0.5 at the middle layer learnt no fact.
    # 0 = train.lr.
    lr: Annotated[float, Range(0, 100000)] = 4.0
    # Update rule of the value rows: "sgd" = plain SGD (p -= lr * grad), as the paper; "optimizer" =
    # train.optimizer (AdamW), whose per-element normalisation moves every chosen row by about lr.
    value_rule: Literal["sgd", "optimizer"] = "optimizer"
    # What a token's query reads: "token" = its own hidden state (the paper); "prefix_mean" = the mean
    # of the (RMS-normalised) hidden states up to it, so the subject named earlier takes part in the
    # address (docs/methods/smf.md, "Which slots a wording reads").
    query: Literal["token", "prefix_mean"] = "token"

    def validate(self, section: str) -> list[str]:
        """Cross-field rules; each field's own range is declared above (data/fields.py)."""
        problems = []
        if self.key_dim % 2:
            problems.append(f"method.{section}.key_dim must be an even number (got {self.key_dim})")
        if self.top_k > self.num_keys:
            problems.append(f"method.{section}.top_k must be in [1, num_keys={self.num_keys}] (got {self.top_k})")
        return problems


class ProductKeyMemory(nn.Module):
    """Product-key memory with `num_banks` value tables over one set of keys.

    smf uses one bank. casm uses one bank per period: a slot index is an address, and each bank holds
    that address's content for one version, so a later period can override an address without
    touching what an earlier period wrote there.
    """

    def __init__(
        self, hidden_size: int, opts: MemoryOptions, num_banks: int, seed: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.num_keys = opts.num_keys
        self.num_slots = opts.num_keys**2
        self.top_k = opts.top_k
        half = opts.key_dim // 2
        gen = torch.Generator().manual_seed(seed)
        # Random frozen index: unit-variance queries against unit-norm sub-keys.
        query = torch.randn(opts.key_dim, hidden_size, generator=gen) / math.sqrt(hidden_size)
        keys = F.normalize(torch.randn(2, opts.num_keys, half, generator=gen), dim=-1)
        self.query = nn.Parameter(query.to(dtype=dtype, device=device), requires_grad=False)
        self.keys = nn.Parameter(keys.to(dtype=dtype, device=device), requires_grad=False)
        # Zero values: the branch adds exactly 0 until training writes a slot.
        self.values = nn.ParameterList(
            [
                nn.Parameter(torch.zeros(self.num_slots, hidden_size, dtype=dtype, device=device))
                for _ in range(num_banks)
            ]
        )
        # Per-forward bookkeeping, set by the owning method (never saved).
        self.counts: torch.Tensor | None = None  # slot access counts of the current optimizer step
        # sequences that read each slot at least once, while a background is being read (smf background)
        self.seq_counts: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None  # (B, L) 1 for real tokens, from the model's forward
        self.past_len = 0  # tokens already in the KV cache when this forward started (generation)
        self.gates: torch.Tensor | None = None  # (B, L, num_banks) bank gates (casm); None = bank 0 only
        self.last_lookup: tuple[torch.Tensor, torch.Tensor] | None = None  # (indices, weights), when asked
        self.keep_lookup = False
        self.query_input = opts.query
        # query="prefix_mean" under a KV cache: (sum, count) of the inputs of earlier decoding steps
        self._prefix: tuple[torch.Tensor, torch.Tensor] | None = None

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, weights) of shape (..., top_k): the slots a token reads and their softmax weights.

        Always in float32, outside any autocast: under train.mixed_precision bf16 the training forward
        would otherwise score the keys in bf16 (ties included) while evaluation scores them in float32,
        so a fact would be written to slots that evaluation never reads."""
        with torch.autocast(x.device.type, enabled=False):
            return self._lookup(x.float())

    def _lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xf = _rms(x)  # so the index does not depend on the scale of the hidden state
        if self.query_input == "prefix_mean" and xf.dim() == 3:
            xf = _rms(self._prefix_mean(xf))
        q = xf @ self.query.float().t()
        q1, q2 = q.chunk(2, dim=-1)
        s1 = q1 @ self.keys[0].float().t()  # (..., n)
        s2 = q2 @ self.keys[1].float().t()
        v1, i1 = s1.topk(self.top_k, dim=-1)
        v2, i2 = s2.topk(self.top_k, dim=-1)
        combo = v1.unsqueeze(-1) + v2.unsqueeze(-2)  # (..., k, k)
        cidx = i1.unsqueeze(-1) * self.num_keys + i2.unsqueeze(-2)
        scores, pos = combo.flatten(-2).topk(self.top_k, dim=-1)
        indices = cidx.flatten(-2).gather(-1, pos)
        # Sharpened softmax: scores of unit vectors are O(1); a temperature of sqrt(dim) makes reads
        # selective enough that two facts rarely share most of their weight.
        weights = torch.softmax(scores * math.sqrt(q1.shape[-1]), dim=-1)
        return indices, weights

    def _prefix_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H): the mean of each sequence's real tokens up to each position, continuing the sums
        of earlier decoding steps when a KV cache holds them (padding takes no part)."""
        mask = self._token_mask_like(x.shape[0], x.shape[1])
        w = mask.unsqueeze(-1).to(x) if mask is not None else torch.ones_like(x[..., :1])
        total, count = (x * w).cumsum(1), w.cumsum(1)
        if self.past_len and self._prefix is not None and self._prefix[0].shape[0] == x.shape[0]:
            total = total + self._prefix[0].unsqueeze(1)
            count = count + self._prefix[1].unsqueeze(1)
        self._prefix = (total[:, -1], count[:, -1])
        return total / count.clamp_min(1)

    def read(self, bank: int, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        flat_i = indices.reshape(-1, self.top_k)
        flat_w = weights.reshape(-1, self.top_k).to(self.values[bank].dtype)
        out = F.embedding_bag(flat_i, self.values[bank], per_sample_weights=flat_w, mode="sum")
        return out.reshape(*indices.shape[:-1], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            indices, weights = self.lookup(x)
        if self.keep_lookup:
            self.last_lookup = (indices, weights)
        if self.counts is not None and torch.is_grad_enabled():
            mask = self._mask_like(indices)
            picked = indices[mask] if mask is not None else indices
            self.counts += torch.bincount(picked.reshape(-1), minlength=self.num_slots).to(self.counts)
        if self.seq_counts is not None and indices.dim() == 3:
            self.seq_counts += self._sequences_reading(indices)
        if self.gates is None:
            return self.read(0, indices, weights).to(x.dtype)
        out = torch.zeros_like(x)
        for bank in range(self.gates.shape[-1]):
            out = out + self.gates[..., bank : bank + 1].to(x.dtype) * self.read(bank, indices, weights).to(x.dtype)
        return out

    def _sequences_reading(self, indices: torch.Tensor) -> torch.Tensor:
        """(num_slots,) how many of the batch's sequences read each slot (padding excluded)."""
        flat = indices.reshape(indices.shape[0], -1)
        mask = self._mask_like(indices)
        if mask is not None:  # padding reads a spare column that is dropped below
            flat = flat.masked_fill(~mask.unsqueeze(-1).expand_as(indices).reshape_as(flat), self.num_slots)
        seen = torch.zeros(flat.shape[0], self.num_slots + 1, dtype=torch.bool, device=flat.device)
        seen.scatter_(1, flat, True)
        return seen[:, :-1].sum(0).to(self.seq_counts)

    def _mask_like(self, indices: torch.Tensor) -> torch.Tensor | None:
        if indices.dim() != 3:
            return None
        return self._token_mask_like(indices.shape[0], indices.shape[1])

    def _token_mask_like(self, batch: int, length: int) -> torch.Tensor | None:
        mask = self.token_mask
        if mask is None or mask.shape[0] != batch or mask.shape[1] < length:
            return None
        return mask[:, -length:].bool()  # with a KV cache only the newest positions are here


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
