"""Speed benchmark: training tokens/s (per rank and in total), step time, peak memory, MFU on GPUs,
eval probes/s and checkpoint size per method.

Speed is measured here, never in a timed test. Examples (numbers in docs/benchmarks.md):

    uv run python scripts/bench.py --mode synthetic --methods full_ft,lora --steps 30
    uv run python scripts/bench.py --mode real --methods lora --steps 8 --threads 2
    uv run python scripts/torchrun.py --nproc-per-node 2 scripts/bench.py --mode synthetic --methods lora --steps 20
    # the GPU table (full_ft and lora in bf16, checkpointing on/off, QLoRA, 2 GPUs), one markdown + JSON file:
    bash scripts/bench_gpu.sh            # = python scripts/bench.py --suite
    bash scripts/bench_gpu.sh --smoke    # the same rows on CPU with a tiny model, in seconds
    # the main job's training side by side (issue 24): our step unpacked and packed, a stock HF Trainer,
    # and the matmul floor of this machine (fp32 CPU by default, configs/real.yaml's data, model and LoRA):
    uv run python scripts/bench.py --compare --steps 6 --threads 2 --rounds 2

Every optimizer step is one micro-batch of max_tokens // seq_len sequences of exactly seq_len real
tokens (the benchmark's passages tokenised and packed end to end, repeated as often as the steps need),
so the token budget is filled with real tokens and the rates count no padding.

Under torchrun every rank trains its own micro-batches (DDP, as train.strategy ddp wraps it); rank 0
prints one row with the per-rank and the total rate.

Only torch, transformers, peft and accelerate are needed (bitsandbytes for the 4-bit row): nothing here
imports the scorers (rouge-score and the other evaluation packages); --eval-probes > 0 does, lazily.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from scripts.command import Parser, command, exit_quietly, prepare  # noqa: E402

if __name__ == "__main__":
    prepare()  # quiet libraries and the stop flag, before torch loads (scripts/command.py)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from training.batching import collate, collate_packed, epoch_batches, model_inputs  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.distributed import close_world, init_world  # noqa: E402
from training.methods import METHODS, Method  # noqa: E402

# what one row measures lives in training/benchmarking.py; its names stay reachable here for the suite's tests
from training.benchmarking import (  # noqa: E402, F401
    CARDS,
    H100_PCIE_SMS,
    Card,
    identify_card,
    device_card,
    logical_numel,
    count_params,
    matmul_params,
    train_flops_per_token,
    reset_peak_memory,
    peak_memory,
    frozen_imports,
    measured,
    packed_sequences,
    rows_per_step,
    PRECISIONS,
    resolve_precision,
    autocast_for,
    trainable_to_fp32,
    wrap_for_world,
    param_dtype,
    random_4bit_source,
    bench_method,
)


# -- the table (scripts/bench_gpu.sh) -----------------------------------------------------------------
@dataclass(frozen=True)
class RowSpec:
    label: str
    method: str
    quantize: str = "none"
    checkpointing: bool = False
    ranks: int = 1
    items: str = ""  # "": seq_len-token rows of concatenated passages; "unpacked" / "packed": passages as items


SUITE = [
    RowSpec("full_ft", "full_ft"),
    RowSpec("lora", "lora"),
    RowSpec("full_ft + checkpointing", "full_ft", checkpointing=True),
    RowSpec("lora + checkpointing", "lora", checkpointing=True),
    RowSpec("qlora (4-bit)", "lora", quantize="4bit"),
    RowSpec("full_ft, 2 GPUs (ddp)", "full_ft", ranks=2),
    RowSpec("lora, 2 GPUs (ddp)", "lora", ranks=2),
    # train.pack against the trainer's default layout, on the same items in the same micro-batches
    RowSpec("lora, passages unpacked", "lora", items="unpacked"),
    RowSpec("lora, passages packed (train.pack)", "lora", items="packed"),
]


@dataclass(frozen=True)
class SuiteConfig:
    hidden: int
    layers: int
    heads: int
    steps: int
    warmup: int
    seq_len: int
    max_tokens: int
    precision: str
    num_facts: int
    threads: int = 0


# gpu: a 1B-class Llama with random weights (hidden 2048, 20 layers: 1.0B in its linear layers), 32
# sequences of 512 tokens per step; smoke: the same rows with a tiny model on CPU, in seconds.
PRESETS = {
    "gpu": SuiteConfig(hidden=2048, layers=20, heads=16, steps=10, warmup=2, seq_len=512, max_tokens=16384,
                       precision="bf16", num_facts=48),
    "smoke": SuiteConfig(hidden=64, layers=2, heads=4, steps=2, warmup=1, seq_len=64, max_tokens=256,
                         precision="bf16", num_facts=8, threads=1),
}

COLUMNS = [  # (key in the row, header in the markdown table)
    ("row", "row"), ("precision", "precision"), ("gradient_checkpointing", "grad ckpt"), ("ranks", "GPUs"),
    ("step_time_s", "step time (s)"), ("tokens_per_step_per_rank", "tokens/step per GPU"),
    ("train_tokens_per_s_total", "tokens/s"), ("train_tokens_per_s_per_rank", "tokens/s per GPU"),
    ("padding_share", "padding"), ("mfu", "MFU"), ("peak_memory_gib", "peak memory (GiB)"), ("params_m", "params (M)"),
    ("trainable_params_m", "trainable (M)"), ("status", "status"),
]


def skip_reason(spec: RowSpec, device: torch.device) -> str | None:
    if (spec.quantize == "4bit" or spec.ranks > 1) and device.type != "cuda":
        return "skipped: needs CUDA"
    if spec.quantize == "4bit" and find_spec("bitsandbytes") is None:
        return "skipped: bitsandbytes not installed"
    if spec.ranks > 1 and torch.cuda.device_count() < spec.ranks:
        return f"skipped: needs {spec.ranks} GPUs ({torch.cuda.device_count()} visible)"
    return None


def bench_args(cfg: SuiteConfig, spec: RowSpec) -> list[str]:
    """The command-line form of one row, for the ranks torchrun starts."""
    args = ["--mode", "synthetic", "--methods", spec.method, "--hidden", str(cfg.hidden), "--layers", str(cfg.layers),
            "--heads", str(cfg.heads), "--steps", str(cfg.steps), "--warmup", str(cfg.warmup),
            "--seq-len", str(cfg.seq_len), "--max-tokens", str(cfg.max_tokens), "--precision", cfg.precision,
            "--num-facts", str(cfg.num_facts), "--quantize", spec.quantize, "--eval-probes", "0"]
    return args + (["--gradient-checkpointing"] if spec.checkpointing else [])


def run_in_process(cfg: SuiteConfig, spec: RowSpec, device: torch.device) -> dict[str, Any]:
    model_cfg = ModelConfig(synthetic_hidden_size=cfg.hidden, synthetic_layers=cfg.layers, synthetic_heads=cfg.heads,
                            dtype="bfloat16" if cfg.precision == "bf16" else "float32", quantize=spec.quantize)
    return measured(device, lambda: bench_method(
        spec.method, "synthetic", cfg.steps, cfg.max_tokens, 0, model_cfg=model_cfg, precision=cfg.precision,
        checkpointing=spec.checkpointing, seq_len=cfg.seq_len, num_facts=cfg.num_facts, warmup=cfg.warmup,
        items=spec.items) or {})


def run_with_torchrun(cfg: SuiteConfig, spec: RowSpec) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(spec.ranks),
           str(Path(__file__).resolve()), *bench_args(cfg, spec)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not rows:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"torchrun exited {done.returncode}: {tail[:200]}")
    return rows[-1]


def run_suite(cfg: SuiteConfig, device: torch.device, specs: list[RowSpec] = SUITE,
              local: Callable[[SuiteConfig, RowSpec, torch.device], dict[str, Any]] = run_in_process,
              ranked: Callable[[SuiteConfig, RowSpec], dict[str, Any]] = run_with_torchrun) -> list[dict[str, Any]]:
    """Every row of the table; a skipped or failed row stays in it with its reason, the others go on."""
    rows = []
    for spec in specs:
        base = {"row": spec.label, "method": spec.method, "quantize": spec.quantize,
                "gradient_checkpointing": spec.checkpointing, "ranks": spec.ranks, "precision": cfg.precision}
        reason = skip_reason(spec, device)
        if reason:
            rows.append({**base, "status": reason})
            continue
        try:
            measured_row = ranked(cfg, spec) if spec.ranks > 1 else local(cfg, spec, device)
            rows.append({**measured_row, **base, "status": "ok"})
        except Exception as exc:  # noqa: BLE001 -- out of memory in one row must not cost the others
            rows.append({**base, "status": f"failed: {type(exc).__name__}: {first_line(exc)}"})
    return rows


def first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "precision" and row.get("quantize") == "4bit":
        return f"{value}, nf4 base"
    if key in ("mfu", "padding_share"):
        return f"{value:.1%}" if isinstance(value, float) else "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "-" if value is None else str(value)


def markdown_table(card: Card, cfg: SuiteConfig, rows: list[dict[str, Any]]) -> str:
    peak = f"dense bf16 peak {card.peak_flops / 1e12:.0f} TFLOP/s" if card.peak_flops else "peak unknown: MFU -"
    lines = [
        f"Card: {card.name} ({card.label}; {card.sm_count} SMs, {card.memory_gib:.1f} GiB; {peak})"
        if card.sm_count else f"Device: {card.name} ({peak})",
        f"Model: synthetic Llama, hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads; "
        f"{cfg.max_tokens // cfg.seq_len} sequences x {cfg.seq_len} real tokens per step (the passages rows: "
        f"passages as items, length-bucketed under the same {cfg.max_tokens}-token budget, padded or packed "
        f"into one row), {cfg.steps} timed steps after {cfg.warmup} warm-up; torch {torch.__version__}",
        "",
        "| " + " | ".join(h for _, h in COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(out: Path, card: Card, cfg: SuiteConfig, rows: list[dict[str, Any]]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(card, cfg, rows)
    (out / "bench_gpu.md").write_text(table)
    payload = {"card": asdict(card), "visible_gpus": torch.cuda.device_count(), "config": asdict(cfg),
               "torch": torch.__version__, "cuda": torch.version.cuda, "rows": rows}
    (out / "bench_gpu.json").write_text(json.dumps(payload, indent=1) + "\n")
    return table


# -- the main job's training, side by side (--compare) ------------------------------------------------
# One process, one model load per row, the same data: the items of the main job's first period (the
# config's benchmark, tokenised by its workload, so QA items keep their masked prompts), in the batches
# its plan makes (train.max_tokens_per_batch, train.max_batch_size), the config's method and LoRA options,
# AdamW at train.lr, clipping at train.max_grad_norm, fp32 on CPU. Rates count real tokens only.
#
#   ours, unpacked   the trainer's micro-batch: length-bucketed items, right padding (training/batching.collate)
#   ours, packed     train.pack: the same items end to end in one row, positions restarting per item
#                    (the two on one model, interleaved step by step: bench_ours)
#   HF Trainer       a stock transformers.Trainer on the same items (and the same peft model): its own
#                    random sampler, per_device_train_batch_size = train.max_batch_size, the stock causal-LM
#                    collator (DataCollatorForLanguageModeling(mlm=False): dynamic padding to the longest of
#                    the batch, loss on every real token), its default AdamW; nothing tuned. It is the baseline
#                    the ratios divide by.
#
# The matmul floor: the step's linear-layer matmuls alone (forward, the activations' gradient through every
# layer, the weights' gradient for the trained ones, at the shapes of a micro-batch of the plan's mean real
# tokens), timed as plain torch.matmul in the model's dtype on this machine; floor tokens/s = tokens / that
# time. A row's "of floor" is its tokens/s over the floor's: what the rest of the step (attention, norms,
# softmax over the vocabulary, the optimizer, the framework) costs. Attention's own matmuls are left out.

def _compare_config(path: str) -> Any:
    from training.config import build_run_configs, load_tree

    return build_run_configs(load_tree(path, None, {}, []), METHODS)[0]


def _main_job_items(cfg: Any, tokenizer: Any) -> tuple[Any, list[list[int]]]:
    """The first period's training data as the trainer tokenises it, and its first epoch's plan."""
    from training.workload import load_workload  # imports the scorers, as the trainer does

    work = load_workload(cfg.data)
    stage = work.stages[0]
    data = work.tokenize(tokenizer, stage, [p + c for p, c in stage.pairs], cfg.train.max_seq_len)
    plan = epoch_batches([len(t) for t in data.token_ids], cfg.train.max_tokens_per_batch, cfg.train.max_batch_size,
                         cfg.seed, 1, 0)
    return data, plan


def _prepared(cfg: Any) -> tuple[Any, nn.Module, Method, Any]:
    from training.restore import build_model_and_method
    from training.workload import load_workload

    loaded, method, model = build_model_and_method(cfg, load_workload(cfg.data))
    return loaded, model, method, loaded.tokenizer


def bench_ours(cfg: Any, steps: int, warmup: int) -> dict[str, dict[str, Any]]:
    """The trainer's train_step (training/trainer.py) for one micro-batch per step, as the main job runs it,
    unpacked and packed on the same model, interleaved: each micro-batch of the plan is trained once in each
    layout, the first layout alternating from step to step, so a load that comes and goes on a shared
    machine hits both alike (whole rows one after the other moved by 2x between rounds). The pairs train
    the same items twice; that changes nothing a throughput measures."""
    loaded, model, method, tokenizer = _prepared(cfg)
    data, plan = _main_job_items(cfg, tokenizer)
    masked = data.num_masked or None
    params = [p for g in method.trainable_parameters(model) for p in g["params"]]
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                            weight_decay=cfg.train.weight_decay)
    model.train()
    totals = {layout: {"tokens": 0, "slots": 0, "seconds": 0.0} for layout in ("unpacked", "packed")}
    for i in range(steps + warmup):
        idx = plan[i % len(plan)]
        ids = [data.token_ids[j] for j in idx]
        num_masked = [masked[j] for j in idx] if masked else None
        for layout in (("unpacked", "packed") if i % 2 == 0 else ("packed", "unpacked")):
            batch = collate_packed(ids, tokenizer.pad_token_id, num_masked) if layout == "packed" else \
                collate(ids, tokenizer.pad_token_id, num_masked)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(**model_inputs(batch))
            loss = out.loss + (method.extra_loss(model, {**batch, "texts": []}, out) or 0)
            loss.backward()
            method.after_backward(model)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
            method.after_optimizer_step(model)
            if i >= warmup:
                total = totals[layout]
                total["seconds"] += time.perf_counter() - start
                total["tokens"] += int(batch["attention_mask"].sum())
                total["slots"] += batch["attention_mask"].numel()
    return {layout: {"tokens": t["tokens"], "seconds": t["seconds"], "model": model,
                     "padding_share": round(1 - t["tokens"] / t["slots"], 4)} for layout, t in totals.items()}


def bench_hf_trainer(cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
    """A stock transformers.Trainer on the same items and the same peft model; timed from the end of its
    warm-up steps to the end of the last step (a callback), tokens counted in the collator."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    loaded, model, method, tokenizer = _prepared(cfg)
    data, _ = _main_job_items(cfg, tokenizer)
    stock = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    counted: list[tuple[int, int]] = []

    def collator(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = stock(features)
        counted.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            marks.append(time.perf_counter())

    out_dir = tempfile.mkdtemp(prefix="bench-hf-")
    try:
        args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=cfg.train.max_batch_size,
                                 max_steps=steps + warmup, learning_rate=cfg.train.lr,
                                 max_grad_norm=cfg.train.max_grad_norm, lr_scheduler_type="constant",
                                 save_strategy="no", report_to=[], logging_strategy="no",
                                 use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=cfg.seed,
                                 dataloader_num_workers=0, remove_unused_columns=False)
        dataset = [{"input_ids": list(t)} for t in data.token_ids]
        with contextlib.redirect_stdout(io.StringIO()):  # its end-of-training summary line, not our table
            Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                    callbacks=[Clock()]).train()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    # batch i of the run is counted[i] (the loader fetches in order; one fetched ahead is never trained)
    timed = counted[warmup:warmup + steps]
    real, slots = sum(r for r, _ in timed), sum(s for _, s in timed)
    return {"tokens": real, "seconds": marks[warmup + steps - 1] - marks[warmup - 1] if warmup else
            marks[steps - 1], "padding_share": round(1 - real / slots, 4)}


def matmul_floor(model: nn.Module, tokens: int, repeats: int = 3) -> float:
    """Seconds of the linear layers' matmuls of one step at `tokens` rows: forward x @ W.T, the input's
    gradient g @ W for every layer (the backward goes through frozen layers too), and the weight's
    gradient g.T @ x for the trained ones; the best of `repeats` timings per shape."""
    shapes: dict[tuple[int, int, bool], int] = {}
    seen: set[int] = set()
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and w is not None and id(w) not in seen:
            seen.add(id(w))
            key = (w.shape[0], w.shape[1], w.requires_grad)
            shapes[key] = shapes.get(key, 0) + 1
    dtype = next(model.parameters()).dtype
    total = 0.0
    for (out_f, in_f, trained), count in shapes.items():
        x, w, g = (torch.randn(tokens, in_f, dtype=dtype), torch.randn(out_f, in_f, dtype=dtype),
                   torch.randn(tokens, out_f, dtype=dtype))
        products = [(x, w.T), (g, w)] + ([(g.T, x)] if trained else [])
        for a, b in products:
            torch.matmul(a, b)  # warm
            best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(repeats))
            total += best * count
    return total


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare_rows(cfg: Any, steps: int, warmup: int, rounds: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The three rows, `rounds` times (ours unpacked and packed interleaved step by step, then the HF
    Trainer), each row's best round kept; the floor is measured in every round, best kept."""
    labels = ("ours, unpacked", "ours, packed", "HF Trainer (stock)")
    best: dict[str, dict[str, Any]] = {}
    floor: dict[str, Any] = {}
    for _ in range(rounds):
        ours = bench_ours(cfg, steps, warmup)
        results = {labels[0]: ours["unpacked"], labels[1]: ours["packed"],
                   labels[2]: bench_hf_trainer(cfg, steps, warmup)}
        model = ours["unpacked"]["model"]
        per_step = ours["unpacked"]["tokens"] / steps
        seconds = matmul_floor(model, round(per_step))
        if not floor or seconds < floor["matmul_seconds_per_step"]:
            floor = {"tokens_per_step": round(per_step), "matmul_seconds_per_step": round(seconds, 4),
                     "floor_tokens_per_s": round(per_step / seconds, 1)}
        del model, ours
        gc.collect()
        for label in labels:
            result = results[label]
            row = {"row": label, "tokens": result["tokens"], "seconds": round(result["seconds"], 3),
                   "train_tokens_per_s": round(result["tokens"] / result["seconds"], 1),
                   "padding_share": result["padding_share"],
                   "rounds_tokens_per_s": best.get(label, {}).get("rounds_tokens_per_s", [])}
            row["rounds_tokens_per_s"] = row["rounds_tokens_per_s"] + [row["train_tokens_per_s"]]
            if label not in best or row["train_tokens_per_s"] > best[label]["train_tokens_per_s"]:
                best[label] = row
            else:
                best[label]["rounds_tokens_per_s"] = row["rounds_tokens_per_s"]
        del results
    rows = [best[label] for label in labels]
    hf = rows[-1]["train_tokens_per_s"]
    for r in rows:
        r["vs_hf_trainer"] = round(r["train_tokens_per_s"] / hf, 3)
        r["of_matmul_floor"] = round(r["train_tokens_per_s"] / floor["floor_tokens_per_s"], 3)
    return rows, floor


def main_compare(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _compare_config(args.config)
    steps, warmup = args.steps or 6, 2 if args.warmup is None else args.warmup
    with frozen_imports():
        rows, floor = compare_rows(cfg, steps, warmup, args.rounds)
    header = (f"main job's training ({args.config}: method {cfg.method.name}, mode {cfg.mode}, "
              f"{cfg.train.max_batch_size} items / {cfg.train.max_tokens_per_batch} tokens per micro-batch), "
              f"{steps} timed steps after {warmup}, best of {args.rounds} rounds, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}")
    print(header)
    print(f"matmul floor: {floor['floor_tokens_per_s']} tokens/s ({floor['matmul_seconds_per_step']} s of linear-layer "
          f"matmuls per step of {floor['tokens_per_step']} tokens)")
    print("| row | real tokens/s | padding | x HF Trainer | of matmul floor |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['row']} | {r['train_tokens_per_s']} | {r['padding_share']:.1%} | {r['vs_hf_trainer']:.2f} | "
              f"{r['of_matmul_floor']:.0%} |")
    print(json.dumps({"compare": rows, "floor": floor}))
    if args.mc_questions:
        print_mc_section(args.mc_questions, args.mc_formats.split(","), args.mc_batch_size)
    return 0


def print_mc_section(questions: int, formats: list[str], batch_size: int) -> None:
    """Multiple-choice scoring in the same run: ours (shared context), ours per request and lm-eval's hf backend
    on the same MMLU questions and model (scripts/bench_mc.py), scoring time only."""
    from scripts.bench_mc import run_mc_bench  # lazily: it needs the scorers and lm-eval

    print(f"multiple choice: {questions} MMLU questions per format, SmolLM2-135M-Instruct fp32, batch {batch_size}, "
          f"scoring time only (model load excluded for all)")
    print("| format | ours (shared context) s | ours per request s | lm-eval hf s | lm-eval / ours | same answers "
          "as lm-eval | max abs ll diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    results = []
    for fmt in formats:
        r = run_mc_bench(questions, fmt, batch_size, paths=("lm_eval", "new", "old"))
        results.append(r)
        print(f"| {fmt} | {r['new']['seconds']:.1f} | {r['old']['seconds']:.1f} | {r['lm_eval']['seconds']:.1f} | "
              f"{r['lm_eval']['seconds'] / r['new']['seconds']:.2f}x | {r['new']['same_choice_as_ref']}/{questions} | "
              f"{max(r['new']['max_abs_ll_diff'], r['old']['max_abs_ll_diff']):.1e} |")
    print(json.dumps({"multiple_choice": results}))


# -- command line -------------------------------------------------------------------------------------
def suite_config(args: argparse.Namespace) -> SuiteConfig:
    """The preset, with any size the user gave on the command line."""
    preset = PRESETS["smoke" if args.smoke else "gpu"]
    given = {f: getattr(args, f) for f in ("hidden", "layers", "heads", "steps", "warmup", "seq_len", "max_tokens",
                                            "num_facts", "threads")
             if getattr(args, f) is not None}
    if args.precision != "auto":
        given["precision"] = args.precision
    return replace(preset, **given)


def main_suite(args: argparse.Namespace) -> int:
    cfg = suite_config(args)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    with frozen_imports():
        rows = run_suite(cfg, device)
    print(write_table(Path(args.out), device_card(device), cfg, rows), end="")
    print(f"written: {Path(args.out) / 'bench_gpu.md'} and {Path(args.out) / 'bench_gpu.json'}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


def main_methods(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"auto": "auto", "bf16": "bfloat16", "fp32": "float32"}[args.precision]
    model_cfg = ModelConfig(synthetic_hidden_size=args.hidden or 64, synthetic_layers=args.layers or 2,
                            synthetic_heads=args.heads or 4, dtype=dtype, quantize=args.quantize)
    world = init_world(model_cfg.device)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        with frozen_imports():
            for name in args.methods.split(","):
                row = measured(device, lambda: bench_method(
                    name, args.mode, args.steps or 20, args.max_tokens or 512, args.eval_probes,
                    model_cfg=model_cfg, world=world, precision=args.precision,
                    checkpointing=args.gradient_checkpointing, seq_len=args.seq_len or 128,
                    num_facts=args.num_facts or 48, warmup=2 if args.warmup is None else args.warmup) or {})
                if world.is_main:
                    print(json.dumps(row), flush=True)
    finally:
        close_world()
    return 0


@command("bench")
def main(argv: list[str]) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="store_true", help="the GPU table: every row, one markdown and one JSON file")
    p.add_argument("--compare", action="store_true",
                   help="the main job's training: ours unpacked, packed, a stock HF Trainer, the matmul floor")
    p.add_argument("--config", default=str(REPO / "configs" / "real.yaml"), help="--compare: the main job's config")
    p.add_argument("--rounds", type=int, default=2, help="--compare: rounds of the three rows in turn; best kept")
    p.add_argument("--mc-questions", type=int, default=0,
                   help="--compare: also score this many MMLU questions with ours and lm-eval (0 = skip)")
    p.add_argument("--mc-formats", default="letter,cloze", help="--compare: letter, cloze or both")
    p.add_argument("--mc-batch-size", type=int, default=8, help="--compare: lm-eval's batch size, ours the same")
    p.add_argument("--smoke", action="store_true", help="the table's rows with a tiny model in seconds (CPU)")
    p.add_argument("--out", default="runs/bench_gpu", help="--suite: where bench_gpu.md and bench_gpu.json go")
    p.add_argument("--mode", choices=["real", "synthetic"], default="synthetic")
    p.add_argument("--methods", default="full_ft,lora")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 20; suite 10, smoke 2)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 2; smoke 1)")
    p.add_argument("--max-tokens", type=int, help="real tokens per optimizer step (default 512; suite 16384)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 128; suite 512)")
    p.add_argument("--num-facts", type=int, help="facts of the generated benchmark the text comes from")
    p.add_argument("--eval-probes", type=int, default=64, help="0: no eval (needs the scorers' packages)")
    p.add_argument("--threads", type=int)
    p.add_argument("--hidden", type=int, help="synthetic model: hidden size (2048: 1B-class with --layers 20)")
    p.add_argument("--layers", type=int, help="synthetic model: decoder layers")
    p.add_argument("--heads", type=int, help="synthetic model: attention heads")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="bf16: bf16 frozen weights, fp32 trainable weights, bf16 autocast; auto: bf16 on CUDA")
    p.add_argument("--quantize", choices=["none", "4bit"], default="none", help="4bit: QLoRA's NF4 (CUDA)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    args = p.parse_args(argv)
    # the command contract maps ConfigError to one line and exit 2, a stop to 75, a bug to 70
    if args.compare:
        return main_compare(args)
    return main_suite(args) if args.suite or args.smoke else main_methods(args)


if __name__ == "__main__":
    exit_quietly(main())  # a stop signal during teardown must not kill a finished process
