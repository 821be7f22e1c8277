"""What scripts/bench.py measures, as functions: the card and its peak for MFU, parameter and FLOP counts,
peak memory, the packed micro-batches of real tokens, and one method's training and eval speed
(bench_method). scripts/bench.py holds the suite, the tables and the side-by-side comparisons; docs/benchmarks.md
the numbers. Speed is measured with these, never in a timed test.
"""

from __future__ import annotations

import gc
import math
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data import DataConfig, load_benchmark
from training.batching import collate, collate_packed, epoch_batches, model_inputs
from training.config import ConfigError, ModelConfig
from training.distributed import World
from training.methods import METHODS, Method, MethodContext
from training.models import build_synthetic, enable_checkpointing, load_model

# -- the card and its peak ----------------------------------------------------------------------------
# Dense bf16 tensor-core peak with fp32 accumulation (vendor data sheets, without 2:4 sparsity), for MFU.
# First match wins, so the specific names come before the family. torch reports the H100 SXM5 board as
# "NVIDIA H100 80GB HBM3" and the PCIe card as "NVIDIA H100 PCIe"; a bare "H100" is told apart by its SMs
# and memory (identify_card). A10G (AWS) is left out: NVIDIA publishes no data sheet for it.
CARDS: list[tuple[str, str, float]] = [
    (r"GH200", "GH200", 989e12),
    (r"H200.*NVL", "H200 NVL", 835e12),
    (r"H200", "H200 SXM", 989e12),
    (r"H100.*PCIe", "H100 PCIe", 756e12),
    (r"H100.*NVL", "H100 NVL", 835e12),
    (r"H100.*(SXM|HBM3)", "H100 SXM", 989e12),
    (r"H800.*PCIe", "H800 PCIe", 756e12),
    (r"H800", "H800 SXM", 989e12),
    (r"GB200", "GB200", 2500e12),
    (r"B200", "B200", 2250e12),
    (r"A100", "A100", 312e12),
    (r"A800", "A800", 312e12),
    (r"L40S", "L40S", 362e12),
    (r"L40\b", "L40", 181e12),
    (r"\bL4\b", "L4", 121e12),
    (r"\bA10\b", "A10", 125e12),
    (r"RTX 4090", "RTX 4090", 165e12),
]
H100_PCIE_SMS = 114  # the SXM5 and NVL boards have 132; NVL has 94 GB (SXM5: 80 GB)


@dataclass(frozen=True)
class Card:
    name: str  # what torch reports
    label: str  # the card as the table names it ("H100 PCIe"), or the name when unknown
    peak_flops: float | None  # dense bf16 FLOP/s; None: unknown card or CPU, MFU is not reported
    sm_count: int = 0
    memory_gib: float = 0.0


def identify_card(name: str, sm_count: int = 0, memory_gib: float = 0.0) -> Card:
    for pattern, label, peak in CARDS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return Card(name, label, peak, sm_count, memory_gib)
    if re.search(r"H100", name):  # no form factor in the name: the SM count and memory tell
        if sm_count == H100_PCIE_SMS:
            return Card(name, "H100 PCIe", 756e12, sm_count, memory_gib)
        if sm_count and memory_gib > 85:
            return Card(name, "H100 NVL", 835e12, sm_count, memory_gib)
        if sm_count:
            return Card(name, "H100 SXM", 989e12, sm_count, memory_gib)
    return Card(name, name, None, sm_count, memory_gib)


def device_card(device: torch.device) -> Card:
    if device.type != "cuda":
        return Card(f"cpu ({torch.get_num_threads()} threads)", "cpu", None)
    props = torch.cuda.get_device_properties(device)
    return identify_card(torch.cuda.get_device_name(device), props.multi_processor_count, props.total_memory / 2**30)


# -- parameters and FLOPs -----------------------------------------------------------------------------
def logical_numel(p: torch.Tensor) -> int:
    """How many weights a parameter holds: bitsandbytes' Params4bit packs two 4-bit values per uint8
    byte, so its numel is half the layer's; its quant_state keeps the original shape."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        return math.prod(shape)
    if type(p).__name__ == "Params4bit":  # not quantised yet (still on the host) or no state kept
        return 2 * p.numel() if p.dtype == torch.uint8 else p.numel()
    return p.numel()


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(logical_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def matmul_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Weights of the linear layers (the output head included; the embedding lookup and the norms do no
    matmul). Linear4bit and LoRA's A and B are nn.Linear; a weight shared by two layers counts once."""
    seen: dict[int, int] = {}
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w is not None and (w.requires_grad or not trainable_only):
            seen[id(w)] = logical_numel(w)
    return sum(seen.values())


def train_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Model FLOPs of one trained token (PaLM's MFU convention, appendix B): 2N forward, 2N backward for
    the activation gradients (needed through frozen weights too, to reach the adapters), 2N_trainable for
    the weight gradients; so 6N for full fine-tuning and about 4N for LoRA and QLoRA. Attention adds
    12 * layers * hidden * seq_len (forward 4, backward 8, causal mask not halved). Checkpointing's
    recomputed forward is not counted: MFU is model FLOPs, not hardware FLOPs."""
    n, n_trainable = matmul_params(model), matmul_params(model, trainable_only=True)
    config = getattr(model, "config", None)
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len if config is not None else 0
    return 4 * n + 2 * n_trainable + attention


# -- memory -------------------------------------------------------------------------------------------
def _rss_high_water() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else None


def reset_peak_memory(device: torch.device) -> None:
    """Before each row: the peak must be that row's, not the largest of all rows so far."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    try:  # Linux: "5" resets the process's resident-set high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_allocated"
    hwm = _rss_high_water()
    if hwm is not None:
        return hwm, "rss"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_process_peak"


@contextmanager
def frozen_imports() -> Iterator[None]:
    """Everything imported so far lives as long as the process: out of the collector's way, the full
    collection before each row (reset_peak_memory) takes milliseconds instead of half a second. Thawed
    at the end, so the interpreter's shutdown frees it as usual (nanobind reports leaks otherwise)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def measured(device: torch.device, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One row: the peak memory is reset before it and read after it."""
    reset_peak_memory(device)
    row = fn()
    memory, kind = peak_memory(device)
    row.update(peak_memory_gib=round(memory / 2**30, 3), peak_memory_kind=kind)
    return row


# -- data: sequences that fill the token budget -------------------------------------------------------
def packed_sequences(passages: list[list[int]], eos: int, seq_len: int, count: int) -> list[list[int]]:
    """`count` sequences of exactly seq_len tokens: the passages (each ended by EOS) end to end, cycled
    as often as needed. A throughput benchmark needs the compute of real tokens, not distinct text."""
    stream = [t for ids in passages for t in (*ids, eos)]
    if not stream:
        raise ConfigError(["bench: the benchmark has no passage text to build sequences from"])
    out, pos = [], 0
    for _ in range(count):
        seq: list[int] = []
        while len(seq) < seq_len:
            take = stream[pos : pos + seq_len - len(seq)]
            seq += take
            pos = (pos + len(take)) % len(stream)
        out.append(seq)
    return out


def rows_per_step(max_tokens: int, seq_len: int) -> int:
    if seq_len > max_tokens:
        raise ConfigError([f"bench: --seq-len {seq_len} is longer than the step's --max-tokens {max_tokens}"])
    return max_tokens // seq_len


# -- one measurement ----------------------------------------------------------------------------------
PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: what training does on this device (bf16 autocast with fp32 trainable weights on CUDA)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def trainable_to_fp32(method: Method, model: nn.Module) -> None:
    """bf16: the frozen backbone stays bf16, the trained weights (and so AdamW's moments) are fp32, the
    matmuls run in bf16 under autocast: an update of about lr is not lost to bf16 rounding."""
    for group in method.trainable_parameters(model):
        for p in group["params"]:
            p.data = p.data.float()


def wrap_for_world(model: nn.Module, method: Method, world: World, device: torch.device) -> nn.Module:
    """As train.strategy ddp wraps the model (training/strategies.py DDP.wrap), without importing the
    strategies, whose module imports the scorers and their optional packages."""
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=method.leaves_parameters_unused,
    )


def param_dtype(model: nn.Module, trainable: bool) -> str:
    """The dtype of the frozen (or the trained) weights; "-" when there are none (full_ft freezes none)."""
    return next((str(p.dtype) for p in model.parameters() if p.requires_grad == trainable), "-")


def random_4bit_source(model_cfg: ModelConfig, bench: Any, seed: int) -> str:
    """NF4 quantises at load time: the random model goes through a directory and the real loader."""
    where = tempfile.mkdtemp(prefix="bench-4bit-")
    plain, tokenizer = build_synthetic(replace(model_cfg, quantize="none"), bench, seed)
    plain.to(torch.bfloat16).save_pretrained(where)  # type: ignore[arg-type]  # transformers types its wrapped .to for models only
    tokenizer.save_pretrained(where)
    return where


def bench_method(
    name: str,
    mode: str,
    steps: int,
    max_tokens: int,
    eval_probes: int,
    seed: int = 0,
    model_cfg: ModelConfig | None = None,
    world: World = World(),
    precision: str = "auto",
    checkpointing: bool = False,
    seq_len: int = 128,
    num_facts: int = 48,
    warmup: int = 2,
    items: str = "",
) -> dict | None:
    """One method's training rate. items "": every step is rows of exactly seq_len tokens (the passages
    end to end, no separation: raw speed); "unpacked" / "packed": the passages as training items in
    length-bucketed micro-batches under the token budget, right-padded (collate) or end to end in one row
    with positions restarting per item (collate_packed, as train.pack does), single process only."""
    model_cfg = model_cfg or ModelConfig()
    bench = load_benchmark("temporalwiki", DataConfig(num_facts=num_facts, passages_per_fact=3))
    tmp_source = None
    if mode == "synthetic" and model_cfg.quantize == "4bit":
        tmp_source = random_4bit_source(model_cfg, bench, seed)
        model_cfg, mode = replace(model_cfg, name=tmp_source), "real"
    try:
        loaded = load_model(model_cfg, mode, bench, seed)
    finally:
        if tmp_source:
            shutil.rmtree(tmp_source, ignore_errors=True)
    device, tokenizer = loaded.device, loaded.tokenizer
    precision = resolve_precision(precision, device)
    ctx = MethodContext(tokenizer=tokenizer, device=device, seed=seed, lr=1e-3, period_names=bench.period_names)
    method = METHODS[name](METHODS[name].config_cls(), ctx)
    torch.manual_seed(seed)
    model = method.prepare(loaded.model)
    if model_cfg.quantize != "4bit":
        model = model.to(device)
    if precision == "bf16":
        trainable_to_fp32(method, model)
    if checkpointing:
        enable_checkpointing(model)
    period = bench.periods[0]
    texts = method.on_period_start(model, period, [p.text for p in period.passages])
    per_step = rows_per_step(max_tokens, seq_len)
    passages = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sequences = packed_sequences(passages, tokenizer.eos_token_id, seq_len, per_step * (steps + warmup) * world.size)
    seq_texts = tokenizer.batch_decode(sequences)  # for methods whose extra loss reads the text
    if items:
        item_ids = [(list(ids) + [tokenizer.eos_token_id])[:seq_len] for ids in passages]
        # the passages repeated until the steps have their budget each (a throughput test needs compute)
        item_ids *= max(1, math.ceil(max_tokens * (steps + warmup) / max(1, sum(map(len, item_ids)))))
        plan = epoch_batches([len(t) for t in item_ids], max_tokens, max_tokens, seed, 1, 0)
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-4)
    wrapped = wrap_for_world(model, method, world, device)
    model.train()
    real_tokens = padded_tokens = 0
    start = 0.0
    for i in range(steps + warmup):
        first = (i * world.size + world.rank) * per_step  # each rank its own micro-batch
        idx = list(range(first, first + per_step))
        if items:
            idx = plan[i % len(plan)]
            chosen = [item_ids[j] for j in idx]
            full = (
                collate_packed(chosen, tokenizer.pad_token_id)
                if items == "packed"
                else collate(chosen, tokenizer.pad_token_id)
            )
        else:
            full = collate([sequences[j] for j in idx], tokenizer.pad_token_id)
        # counted on the host: reading a CUDA tensor would synchronise inside the timed steps
        real, slots = int(full["attention_mask"].sum()), full["attention_mask"].numel()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(full).items()}
        if i == warmup:  # the first steps pay for allocation and lazy init
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast_for(precision, device):
            out = wrapped(**batch)
            texts = [] if items else [seq_texts[j] for j in idx]
            loss = out.loss + (method.extra_loss(model, {**full, **batch, "texts": texts}, out) or 0)
        loss.backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(model)
        if i >= warmup:
            real_tokens += real
            padded_tokens += slots
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    total_tokens = world.sum_float(float(real_tokens))
    per_rank = real_tokens / train_s
    flops = train_flops_per_token(model, seq_len)
    card = device_card(device)
    row = {
        "method": name,
        "mode": mode,
        "device": str(device),
        "card": card.label,
        "precision": precision,
        "base_dtype": param_dtype(model, trainable=False),
        "trainable_dtype": param_dtype(model, trainable=True),
        "quantize": model_cfg.quantize,
        "gradient_checkpointing": checkpointing,
        "ranks": world.size,
        "strategy": "ddp" if world.active else "single",
        "threads": torch.get_num_threads(),
        "params_m": round(count_params(model) / 1e6, 3),
        "trainable_params_m": round(count_params(model, trainable_only=True) / 1e6, 3),
        "steps": steps,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "items": items or "concatenated",
        "tokens_per_step_per_rank": real_tokens // steps,
        "step_time_s": round(train_s / steps, 4),
        "train_tokens_per_s_per_rank": round(per_rank, 1),
        "train_tokens_per_s_total": round(total_tokens / train_s, 1),
        "padding_share": round(1 - real_tokens / padded_tokens, 4),
        "flops_per_token": flops,
        # model FLOPs utilisation of one rank against its device's dense bf16 peak
        "mfu": round(per_rank * flops / card.peak_flops, 4) if card.peak_flops else None,
    }
    if world.active or eval_probes <= 0:  # eval and state sizes are the single-process part of the benchmark
        return row if world.is_main else None
    from eval_and_metrics.evaluate import evaluate_probes  # imports the scorers (rouge-score and others)

    probes = bench.all_probes()[:eval_probes]
    t0 = time.perf_counter()
    evaluate_probes(model, tokenizer, probes, device, batch_size=32)
    state = method.trainable_state_dict(model)
    row.update(
        {
            "eval_probes_per_s": round(len(probes) / (time.perf_counter() - t0), 2),
            "trainable_state_mb": round(sum(t.numel() * t.element_size() for t in state.values()) / 2**20, 3),
            "model_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
        }
    )
    return row
