"""Speed benchmark: training tokens/s (per rank and in total), padding share, peak memory, MFU on GPUs,
eval probes/s and checkpoint size per method.

Speed is measured here, never in a timed test. Examples (numbers in docs/benchmarks.md):

    uv run python scripts/bench.py --mode synthetic --methods full_ft,lora --steps 30
    uv run python scripts/bench.py --mode real --methods lora --steps 8 --threads 2
    uv run torchrun --nproc-per-node 2 scripts/bench.py --mode synthetic --methods lora --steps 20
    # a 1B-class Llama with random weights on one GPU, bf16 (scripts/bench_gpu.sh runs the whole set):
    python scripts/bench.py --mode synthetic --hidden 2048 --layers 20 --heads 16 --dtype bfloat16 \
        --methods full_ft,lora --steps 10 --max-tokens 16384 --seq-len 512 [--gradient-checkpointing] [--quantize 4bit]

Under torchrun every rank trains its own micro-batches through the run's strategy (ddp by default);
rank 0 prints one row with the per-rank and the total rate.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import DataConfig, load_benchmark  # noqa: E402
from eval_and_metrics.evaluate import evaluate_probes  # noqa: E402
from training.batching import collate, epoch_batches, tokenize  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.distributed import World, close_world, init_world  # noqa: E402
from training.methods import METHODS, MethodContext  # noqa: E402
from training.models import build_synthetic, enable_checkpointing, load_model  # noqa: E402
from training.strategies import STRATEGIES, resolve_strategy  # noqa: E402

# Dense bf16 peak of one device (vendor data sheets, without sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def train_flops_per_token(model: torch.nn.Module) -> float:
    """2N for the forward, 2N for the backward through the activations, 2 per trainable weight for its
    gradient (the usual 6N for full fine-tuning, about 4N for adapters); attention's own FLOPs are left out,
    so MFU is slightly understated for long sequences."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * total + 2 * trainable


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"


def bench_method(name: str, mode: str, steps: int, max_tokens: int, eval_probes: int, seed: int = 0,
                 model_cfg: ModelConfig | None = None, world: World = World(), strategy: str = "auto",
                 checkpointing: bool = False, seq_len: int = 128, num_facts: int = 48) -> dict | None:
    model_cfg = model_cfg or ModelConfig()
    bench = load_benchmark("temporalwiki", DataConfig(num_facts=num_facts, passages_per_fact=3))
    if mode == "synthetic" and model_cfg.quantize == "4bit":
        # NF4 quantises at load time: the random model goes through a directory and the real loader
        random_dir = tempfile.mkdtemp(prefix="bench-4bit-")
        plain, tokenizer = build_synthetic(replace(model_cfg, quantize="none"), bench, seed)
        plain.save_pretrained(random_dir)
        tokenizer.save_pretrained(random_dir)
        del plain
        model_cfg, mode = replace(model_cfg, name=random_dir), "real"
    loaded = load_model(model_cfg, mode, bench, seed)
    ctx = MethodContext(tokenizer=loaded.tokenizer, device=loaded.device, seed=seed, lr=1e-3,
                        period_names=bench.period_names)
    method = METHODS[name](METHODS[name].config_cls(), ctx)
    torch.manual_seed(seed)
    model = method.prepare(loaded.model)
    if model_cfg.quantize != "4bit":
        model = model.to(loaded.device)
    if checkpointing:
        enable_checkpointing(model)
    strat = STRATEGIES[resolve_strategy(strategy, world)](world, loaded.device)
    strat.prepare(model)
    period = bench.periods[0]
    texts = method.on_period_start(model, period, [p.text for p in period.passages])
    if seq_len > 128:  # longer sequences for GPU throughput: passages joined end to end
        texts = [" ".join(texts[i:i + seq_len // 24]) for i in range(0, len(texts), max(1, seq_len // 24))]
    data = tokenize(loaded.tokenizer, texts, seq_len)
    batches = epoch_batches([len(t) for t in data.token_ids], max_tokens, 512, seed, 1, 0)
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-4)
    wrapped = strat.wrap(model, method)
    model.train()
    real_tokens = padded_tokens = 0
    start = 0.0
    for i in range(steps + 2):
        idx = batches[(i * world.size + world.rank) % len(batches)]  # each rank its own micro-batch
        batch = collate([data.token_ids[j] for j in idx], loaded.tokenizer.pad_token_id)
        batch = {k: v.to(loaded.device) for k, v in batch.items()}
        if i == 2:  # the first steps pay for allocation and lazy init
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with strat.sync(wrapped, last_round=True):
            out = wrapped(**batch)
            loss = out.loss + (method.extra_loss(model, {**batch, "texts": [texts[j] for j in idx]}, out) or 0)
            loss.backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(model)
        if i >= 2:
            real_tokens += int(batch["attention_mask"].sum())
            padded_tokens += batch["attention_mask"].numel()
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - start
    total_tokens = world.sum_float(float(real_tokens))
    memory, memory_kind = peak_memory(loaded.device)
    per_rank = real_tokens / train_s
    flops = train_flops_per_token(model)
    peak = peak_flops(loaded.device)
    row = {
        "method": name, "mode": mode, "device": str(loaded.device), "dtype": str(next(model.parameters()).dtype),
        "quantize": model_cfg.quantize, "gradient_checkpointing": checkpointing, "ranks": world.size,
        "strategy": strat.name, "threads": torch.get_num_threads(),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "train_tokens_per_s_per_rank": round(per_rank, 1),
        "train_tokens_per_s_total": round(total_tokens / train_s, 1),
        "padding_share": round(1 - real_tokens / padded_tokens, 4),
        "peak_memory_gib": round(memory / 2**30, 2), "peak_memory_kind": memory_kind,
        # model FLOPs utilisation of one rank against its device's dense bf16 peak
        "mfu": round(per_rank * flops / peak, 4) if peak else None,
    }
    if world.active:  # eval and state sizes are the single-process part of the benchmark
        return row if world.is_main else None
    probes = bench.all_probes()[:eval_probes]
    t0 = time.perf_counter()
    evaluate_probes(model, loaded.tokenizer, probes, loaded.device, batch_size=32)
    state = method.trainable_state_dict(model)
    row.update({
        "eval_probes_per_s": round(len(probes) / (time.perf_counter() - t0), 2),
        "trainable_state_mb": round(sum(t.numel() * t.element_size() for t in state.values()) / 2**20, 3),
        "model_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
    })
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["real", "synthetic"], default="synthetic")
    p.add_argument("--methods", default="full_ft,lora")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=512, help="token budget of a micro-batch")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (longer: passages joined)")
    p.add_argument("--eval-probes", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--hidden", type=int, default=64, help="synthetic model: hidden size (2048: 1B-class with --layers 20)")
    p.add_argument("--layers", type=int, default=2, help="synthetic model: decoder layers")
    p.add_argument("--heads", type=int, default=4, help="synthetic model: attention heads")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--quantize", choices=["none", "4bit"], default="none", help="4bit: QLoRA's NF4 (CUDA)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--strategy", default="auto", choices=["auto", *STRATEGIES])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_cfg = ModelConfig(synthetic_hidden_size=args.hidden, synthetic_layers=args.layers,
                            synthetic_heads=args.heads, dtype=args.dtype, quantize=args.quantize)
    world = init_world(model_cfg.device)
    try:
        for name in args.methods.split(","):
            row = bench_method(name, args.mode, args.steps, args.max_tokens, args.eval_probes, model_cfg=model_cfg,
                               world=world, strategy=args.strategy, checkpointing=args.gradient_checkpointing,
                               seq_len=args.seq_len)
            if row is not None:
                print(json.dumps(row), flush=True)
    finally:
        close_world()


if __name__ == "__main__":
    main()
