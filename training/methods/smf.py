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

The memory classes here are shared with casm (training/methods/casm), which gives each period its own
value table over the same keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from data.fields import Items, Range
from data.schema import Probe
from training.batching import PeriodData, collate, tokenize
from training.methods.base import Method, eval_mode
from training.optimizers import SGD_RULE, UPDATE_ROWS
from training.seeding import derive_seed

BACKGROUND_MAX_LEN = 512  # tokens of a passage read for the background (passages are one sentence)
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


@dataclass
class SmfOptions(MemoryOptions):
    # What TF-IDF ranks a step's slots against. "steps": the earlier optimizer steps of this run, one
    # document per step (a fact's own earlier epochs count against it). "passages": the period's
    # training passages, one document per passage, read once at the period start and fixed for the
    # period (the paper ranks against a fixed corpus; we have no pretraining data, docs/methods/smf.md).
    background: Literal["steps", "passages"] = "steps"

    def validate(self) -> list[str]:  # type: ignore[override]
        return MemoryOptions.validate(self, "smf")


# ------------------------------------------------------------------------------------------------
# the memory layer


class ProductKeyMemory(nn.Module):
    """Product-key memory with `num_banks` value tables over one set of keys.

    smf uses one bank. casm uses one bank per period: a slot index is an address, and each bank holds
    that address's content for one version, so a later period can override an address without
    touching what an earlier period wrote there.
    """

    def __init__(self, hidden_size: int, opts: MemoryOptions, num_banks: int, seed: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.num_keys = opts.num_keys
        self.num_slots = opts.num_keys ** 2
        self.top_k = opts.top_k
        half = opts.key_dim // 2
        gen = torch.Generator().manual_seed(seed)
        # Random frozen index: unit-variance queries against unit-norm sub-keys.
        query = torch.randn(opts.key_dim, hidden_size, generator=gen) / math.sqrt(hidden_size)
        keys = F.normalize(torch.randn(2, opts.num_keys, half, generator=gen), dim=-1)
        self.query = nn.Parameter(query.to(dtype=dtype, device=device), requires_grad=False)
        self.keys = nn.Parameter(keys.to(dtype=dtype, device=device), requires_grad=False)
        # Zero values: the branch adds exactly 0 until training writes a slot.
        self.values = nn.ParameterList([
            nn.Parameter(torch.zeros(self.num_slots, hidden_size, dtype=dtype, device=device))
            for _ in range(num_banks)])
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
            out = out + self.gates[..., bank:bank + 1].to(x.dtype) * self.read(bank, indices, weights).to(x.dtype)
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


def _attach_hook(mlp: nn.Module, memory: ProductKeyMemory) -> None:
    mlp.add_module(MEMORY_ATTR, memory)
    # a token's lookup reads its own hidden state, unless the query is the prefix mean: shared-context
    # scoring (eval_and_metrics/evaluate.py packed_mask_kind) may pack rows only in the first case
    mlp.mixes_positions = memory.query_input == "prefix_mean"

    def add_memory(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + module.memory(args[0])

    mlp.register_forward_hook(add_memory)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Llama-style model (model.model.layers), through a peft wrapper if any."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList) and len(module) and hasattr(module[0], "mlp"):
            return list(module)
    raise ValueError("this model has no decoder layers with an .mlp (expected a Llama-style *.layers list)")


def resolve_layers(requested: list[int], num_layers: int, section: str) -> list[int]:
    if not requested:
        # Not the middle, where the paper puts it: its memory is pretrained with the model. Bolted onto a
        # pretrained SmolLM2 (30 layers), a memory at layer 15 barely carried facts over to unseen
        # wordings (probe gold log-prob -3.81); at 20-25, where the last token's state already carries
        # subject and relation, it did far better (-2.90 at layer 22; docs/methods/smf.md).
        return [(3 * num_layers) // 4]
    out = sorted({i % num_layers for i in requested if -num_layers <= i < num_layers})
    if len(out) != len(set(requested)):
        raise ValueError(f"method.{section}.layers {requested} must be distinct indices in "
                         f"[{-num_layers}, {num_layers - 1}] for this {num_layers}-layer model")
    return out


def attach_memories(model: nn.Module, opts: MemoryOptions, num_banks: int, seed: int,
                    section: str) -> dict[int, ProductKeyMemory]:
    """Freeze the backbone and add a memory next to the FFN of each chosen layer."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    chosen = resolve_layers(list(opts.layers), len(layers), section)
    memories: dict[int, ProductKeyMemory] = {}
    for i in chosen:
        mlp = layers[i].mlp
        if hasattr(mlp, MEMORY_ATTR):
            raise ValueError(f"layer {i} already has a memory; prepare() was called twice")
        ref = next(mlp.parameters())
        hidden = int(getattr(model.config, "hidden_size"))
        # float32 whatever the backbone holds: the values train (master weights, training/models.py) and
        # the layer's own weights may be bf16 or packed 4-bit bytes (uint8), never a memory's dtype
        memories[i] = ProductKeyMemory(hidden, opts, num_banks, derive_seed(seed, section, "memory", i),
                                       torch.float32, ref.device)
        _attach_hook(mlp, memories[i])
    return memories


def install_mask_hook(model: nn.Module, memories: dict[int, ProductKeyMemory]) -> None:
    """Give the memories the attention mask of each forward, so padding never counts as an access."""
    def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        # generate() drops an all-ones attention_mask, so the cache length is the reliable signal
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        for mem in memories.values():
            mem.token_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            mem.past_len = past

    model.register_forward_pre_hook(grab, with_kwargs=True)
    model.mixes_positions = False  # it only hands the memories the mask; packed_mask_kind may pack


def value_group(params: list[nn.Parameter], opts: MemoryOptions, default_lr: float) -> dict[str, Any]:
    """The optimizer group of the value tables: their own lr, and plain SGD when value_rule says so
    (training/optimizers: the registry's optimizers update a group marked rule=sgd by plain SGD)."""
    group: dict[str, Any] = {"params": params, "lr": opts.lr or default_lr}
    if opts.value_rule == "sgd":
        group["rule"] = SGD_RULE
    return group


def memory_param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if f".{MEMORY_ATTR}." in n]


# ------------------------------------------------------------------------------------------------
# TF-IDF slot selection


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
        return {"doc_freq": {str(i): t.clone() for i, t in self.doc_freq.items()}, "num_docs": self.num_docs,
                "ever_updated": {str(i): t.clone() for i, t in self.ever_updated.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.doc_freq = {int(i): t.clone() for i, t in state["doc_freq"].items()}
        self.ever_updated = {int(i): t.clone() for i, t in state["ever_updated"].items()}
        self.num_docs = int(state["num_docs"])


@torch.no_grad()
def read_background(model: nn.Module, memories: dict[int, ProductKeyMemory], tokenizer: Any, texts: list[str],
                    max_len: int, batch_size: int = 16) -> tuple[dict[int, torch.Tensor], int]:
    """Document frequencies of every slot over `texts` (one document per text, tokenised as training
    tokenises passages), read by the model as it is now: (per memory layer, how many texts read the
    slot), and the number of texts."""
    device = next(iter(memories.values())).values[0].device
    for mem in memories.values():
        mem.seq_counts = torch.zeros(mem.num_slots, dtype=torch.long, device=device)
    try:
        data = tokenize(tokenizer, texts, max_len)
        with eval_mode(model):
            for start in range(0, len(data.token_ids), batch_size):
                batch = collate(data.token_ids[start:start + batch_size], tokenizer.pad_token_id)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        return {i: m.seq_counts.cpu().clone() for i, m in memories.items()}, len(texts)
    finally:
        for mem in memories.values():
            mem.seq_counts = None


ROWS, DATA = ".rows", ".data"  # suffixes of a value table stored as (written row indices, those rows)


def memory_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every memory tensor; value tables as their written (non-zero) rows only.

    Value tables start at zero and sparse finetuning writes a small share of their rows, so storing
    (row indices, rows) keeps a checkpoint proportional to what was learnt, not to the table size.
    The encoding is exact: a row absent from `.rows` is exactly zero.
    """
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if f".{MEMORY_ATTR}." not in name:
            continue
        tensor = param.detach()
        if f".{MEMORY_ATTR}.values." in name:
            rows = torch.nonzero(tensor.ne(0).any(-1)).flatten()
            state[name + ROWS] = rows.cpu()
            state[name + DATA] = tensor[rows].clone()
        else:
            state[name] = tensor.clone()
    return state


def load_memory_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str,
                           extra: tuple[str, ...] = ()) -> None:
    """Inverse of memory_state_dict (plus the named `extra` dense tensors); a missing or unknown
    name is an error, as in Method.load_trainable_state_dict."""
    params = dict(model.named_parameters())
    expected: set[str] = set(extra)
    for n in memory_param_names(model):
        expected |= {n + ROWS, n + DATA} if f".{MEMORY_ATTR}.values." in n else {n}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise RuntimeError(f"{name}: trainable state mismatch, missing={missing[:5]} unexpected={unexpected[:5]}")
    with torch.no_grad():
        for n in sorted(expected):
            if n.endswith(DATA):
                continue
            if n.endswith(ROWS):
                base = n[:-len(ROWS)]
                table = params[base]
                table.zero_()
                rows = state[n].to(table.device, torch.long)
                table[rows] = state[base + DATA].to(table.device, table.dtype)
            else:
                params[n].copy_(state[n].to(params[n].device, params[n].dtype))


# ------------------------------------------------------------------------------------------------
# the method


class SparseMemoryFinetune(Method):
    name = "smf"
    counts_in_forward = True
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
        self.updater = SparseSlotUpdater(self.memories, self.cfg.top_t,
                                         grow_background=self.cfg.background == "steps")
        return model

    def on_period_start(self, model: nn.Module, period: Any, texts: list[str]) -> list[str]:
        if self.cfg.background == "passages":
            assert self.updater is not None, "prepare() first"
            # a pure function of the model at the period start and the texts, as a resume requires
            self.updater.set_background(*read_background(model, self.memories, self.ctx.tokenizer, texts,
                                                         BACKGROUND_MAX_LEN))
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
