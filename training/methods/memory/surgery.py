"""Model surgery for the product-key memories: which decoder layers get one, attaching them next to the
FFN (a forward hook, so the backbone's own parameter names never change), handing them each forward's
attention mask, the optimizer group of their value tables, and their compact checkpoint encoding."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn

from training.methods.memory.layer import MEMORY_ATTR, MemoryOptions, ProductKeyMemory
from training.optimizers import SGD_RULE
from training.seeding import derive_seed


def _attach_hook(mlp: nn.Module, memory: ProductKeyMemory) -> None:
    mlp.add_module(MEMORY_ATTR, memory)
    # a token's lookup reads its own hidden state, unless the query is the prefix mean: shared-context
    # scoring (eval_and_metrics/evaluate.py packed_mask_kind) may pack rows only in the first case
    mlp.mixes_positions = memory.query_input == "prefix_mean"  # type: ignore[assignment]  # a plain flag: nn.Module.__setattr__ is typed for tensors and modules

    def add_memory(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output + cast(nn.Module, module.memory)(args[0])

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
        raise ValueError(
            f"method.{section}.layers {requested} must be distinct indices in "
            f"[{-num_layers}, {num_layers - 1}] for this {num_layers}-layer model"
        )
    return out


def attach_memories(
    model: nn.Module, opts: MemoryOptions, num_banks: int, seed: int, section: str
) -> dict[int, ProductKeyMemory]:
    """Freeze the backbone and add a memory next to the FFN of each chosen layer."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = decoder_layers(model)
    chosen = resolve_layers(list(opts.layers), len(layers), section)
    memories: dict[int, ProductKeyMemory] = {}
    for i in chosen:
        mlp = cast(nn.Module, layers[i].mlp)  # decoder_layers found an .mlp submodule on every layer
        if hasattr(mlp, MEMORY_ATTR):
            raise ValueError(f"layer {i} already has a memory; prepare() was called twice")
        ref = next(mlp.parameters())
        hf_config: Any = model.config  # a transformers model's config; nn.Module's __getattr__ types it Tensor | Module
        hidden = int(hf_config.hidden_size)
        # float32 whatever the backbone holds: the values train (master weights, training/models.py) and
        # the layer's own weights may be bf16 or packed 4-bit bytes (uint8), never a memory's dtype
        memories[i] = ProductKeyMemory(
            hidden, opts, num_banks, derive_seed(seed, section, "memory", i), torch.float32, ref.device
        )
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
    model.mixes_positions = False  # type: ignore[assignment]  # (a plain flag, as above) it only hands the memories the mask; packed_mask_kind may pack


def value_group(params: list[nn.Parameter], opts: MemoryOptions, default_lr: float) -> dict[str, Any]:
    """The optimizer group of the value tables: their own lr, and plain SGD when value_rule says so
    (training/optimizers: the registry's optimizers update a group marked rule=sgd by plain SGD)."""
    group: dict[str, Any] = {"params": params, "lr": opts.lr or default_lr}
    if opts.value_rule == "sgd":
        group["rule"] = SGD_RULE
    return group


def memory_param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if f".{MEMORY_ATTR}." in n]


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


def load_memory_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], name: str, extra: tuple[str, ...] = ()
) -> None:
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
                base = n[: -len(ROWS)]
                table = params[base]
                table.zero_()
                rows = state[n].to(table.device, torch.long)
                table[rows] = state[base + DATA].to(table.device, table.dtype)
            else:
                params[n].copy_(state[n].to(params[n].device, params[n].dtype))
