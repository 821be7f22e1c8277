"""Speed benchmark: training tokens/s, padding share, eval probes/s and checkpoint size per method.

Speed is measured here, never in a timed test. Example (numbers in docs/benchmarks.md):

    uv run python scripts/bench.py --mode synthetic --methods full_ft,lora --steps 30
    uv run python scripts/bench.py --mode real --methods lora --steps 8 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import DataConfig, load_benchmark  # noqa: E402
from eval_and_metrics.evaluate import evaluate_probes  # noqa: E402
from training.batching import collate, epoch_batches, tokenize  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.methods import METHODS, MethodContext  # noqa: E402
from training.models import load_model  # noqa: E402


def bench_method(name: str, mode: str, steps: int, max_tokens: int, eval_probes: int, seed: int = 0) -> dict:
    bench = load_benchmark("temporalwiki", DataConfig(num_facts=48, passages_per_fact=3))
    loaded = load_model(ModelConfig(), mode, bench, seed)
    ctx = MethodContext(tokenizer=loaded.tokenizer, device=loaded.device, seed=seed, lr=1e-3,
                        period_names=bench.period_names)
    method = METHODS[name](METHODS[name].config_cls(), ctx)
    torch.manual_seed(seed)
    model = method.prepare(loaded.model).to(loaded.device)
    period = bench.periods[0]
    texts = method.on_period_start(model, period, [p.text for p in period.passages])
    data = tokenize(loaded.tokenizer, texts, 128)
    batches = epoch_batches([len(t) for t in data.token_ids], max_tokens, 16, seed, 1, 0)
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-4)
    model.train()
    real_tokens = padded_tokens = 0
    start = None
    for i in range(steps + 2):
        idx = batches[i % len(batches)]
        batch = collate([data.token_ids[j] for j in idx], loaded.tokenizer.pad_token_id)
        batch = {k: v.to(loaded.device) for k, v in batch.items()}
        if i == 2:  # the first steps pay for allocation and lazy init
            start = time.perf_counter()
        out = model(**batch)
        loss = out.loss + (method.extra_loss(model, {**batch, "texts": [texts[j] for j in idx]}, out) or 0)
        loss.backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(model)
        if i >= 2:
            real_tokens += int(batch["attention_mask"].sum())
            padded_tokens += batch["attention_mask"].numel()
    train_s = time.perf_counter() - start
    probes = bench.all_probes()[:eval_probes]
    t0 = time.perf_counter()
    evaluate_probes(model, loaded.tokenizer, probes, loaded.device, batch_size=32)
    eval_s = time.perf_counter() - t0
    state = method.trainable_state_dict(model)
    return {
        "method": name, "mode": mode, "device": str(loaded.device), "threads": torch.get_num_threads(),
        "train_tokens_per_s": round(real_tokens / train_s, 1), "padding_share": round(1 - real_tokens / padded_tokens, 4),
        "eval_probes_per_s": round(len(probes) / eval_s, 2),
        "trainable_state_mb": round(sum(t.numel() * t.element_size() for t in state.values()) / 2**20, 3),
        "model_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["real", "synthetic"], default="synthetic")
    p.add_argument("--methods", default="full_ft,lora")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--eval-probes", type=int, default=64)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.methods.split(","):
        print(json.dumps(bench_method(name, args.mode, args.steps, args.max_tokens, args.eval_probes)), flush=True)


if __name__ == "__main__":
    main()
