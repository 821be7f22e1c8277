"""scripts/bench_gpu.sh: the CPU smoke writes the whole table, and the parts of the GPU measurement that
would be wrong on a GPU (token budget, peak memory per row, 4-bit parameter count, the card's peak) are
checked here without one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from scripts import bench

REPO = Path(__file__).resolve().parent.parent

# The optional packages behind the scorers: a GPU node with only torch, transformers, peft and
# accelerate lacks them, so the bench must not import them.
SCORER_ONLY = ("rouge_score", "nltk", "absl", "eval_and_metrics.scorers")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHON": f"{sys.executable} -X importtime"}
    done = subprocess.run(["bash", "scripts/bench_gpu.sh", "--smoke", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return json.loads((out / "bench_gpu.json").read_text()), (out / "bench_gpu.md").read_text(), imported, done.stdout


def test_smoke_writes_one_table_with_every_row(smoke):
    payload, markdown, _, stdout = smoke
    rows = payload["rows"]
    assert [r["row"] for r in rows] == [s.label for s in bench.SUITE]
    ran = [r for r in rows if r["status"] == "ok"]
    assert {(r["method"], r["gradient_checkpointing"], r["items"]) for r in ran} == {
        ("full_ft", False, "concatenated"), ("lora", False, "concatenated"), ("full_ft", True, "concatenated"),
        ("lora", True, "concatenated"), ("lora", False, "unpacked"), ("lora", False, "packed")}
    for r in ran:
        assert r["step_time_s"] > 0 and r["train_tokens_per_s_total"] > 0 and r["peak_memory_gib"] > 0
        assert r["mfu"] is None  # CPU: no peak to divide by
        assert r["trainable_dtype"] == "torch.float32"  # bf16 autocast trains fp32 weights
    assert {r["status"] for r in rows if r["quantize"] == "4bit" or r["ranks"] > 1} == {"skipped: needs CUDA"}
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(bench.SUITE) and all(line.count("|") == len(bench.COLUMNS) + 1 for line in table)
    assert markdown in stdout  # printed as well as written


def test_every_step_is_the_token_budget_of_real_tokens(smoke):
    payload, *_ = smoke
    budget = payload["config"]["max_tokens"]
    for r in (r for r in payload["rows"] if r["status"] == "ok" and r["items"] == "concatenated"):
        assert r["tokens_per_step_per_rank"] == budget and r["padding_share"] == 0.0
        assert r["train_tokens_per_s_per_rank"] == pytest.approx(budget / r["step_time_s"], rel=0.01)


def test_the_passages_rows_train_the_same_items_padded_and_packed(smoke):
    """train.pack's row: the same micro-batches of items as the unpacked one, so the same real tokens a
    step, with less padding; the rates count real tokens only."""
    payload, *_ = smoke
    by_items = {r["items"]: r for r in payload["rows"] if r["status"] == "ok" and r["items"] != "concatenated"}
    unpacked, packed = by_items["unpacked"], by_items["packed"]
    budget = payload["config"]["max_tokens"]
    assert 0 < packed["tokens_per_step_per_rank"] == unpacked["tokens_per_step_per_rank"] <= budget
    assert packed["padding_share"] < unpacked["padding_share"]
    for r in (unpacked, packed):
        assert r["train_tokens_per_s_per_rank"] == pytest.approx(r["tokens_per_step_per_rank"] / r["step_time_s"],
                                                                 rel=0.05)


def test_the_bench_imports_no_scorer_package(smoke):
    *_, imported, _ = smoke
    assert "peft" in imported and not imported & set(SCORER_ONLY)


def test_packed_sequences_are_exactly_seq_len_and_cycle_the_passages():
    seqs = bench.packed_sequences([[5, 6], [7]], eos=1, seq_len=4, count=3)
    assert seqs == [[5, 6, 1, 7], [1, 5, 6, 1], [7, 1, 5, 6]]
    assert bench.rows_per_step(16384, 512) == 32


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes.nn.Params4bit: uint8 storage, two 4-bit weights per byte."""


def _four_bit_linear(out_f: int, in_f: int, with_state: bool) -> nn.Linear:
    layer = nn.Linear(in_f, out_f, bias=False)
    packed = Params4bit(torch.zeros(out_f * in_f // 2, 1, dtype=torch.uint8), requires_grad=False)
    if with_state:
        packed.quant_state = SimpleNamespace(shape=torch.Size([out_f, in_f]))
    layer.weight = packed
    return layer


@pytest.mark.parametrize("with_state", [True, False])
def test_four_bit_parameters_count_two_weights_per_byte(with_state):
    model = nn.Sequential(_four_bit_linear(8, 16, with_state), nn.Linear(16, 4, bias=False))
    assert bench.logical_numel(model[0].weight) == 128
    assert bench.count_params(model) == 128 + 64
    assert bench.count_params(model, trainable_only=True) == 64
    assert bench.matmul_params(model) == 128 + 64


def test_flops_per_token_are_6n_for_full_and_4n_plus_2_trainable_for_adapters():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    n = 8 * 8 + 8 * 10  # the embedding lookup does no matmul
    assert bench.train_flops_per_token(model, seq_len=4) == 6 * n
    model[1].weight.requires_grad_(False)
    model[2].weight.requires_grad_(False)
    assert bench.train_flops_per_token(model, seq_len=4) == 4 * n


@pytest.mark.parametrize("name, sms, gib, label, tflops", [
    ("NVIDIA H100 PCIe", 114, 79.6, "H100 PCIe", 756),
    ("NVIDIA H100 80GB HBM3", 132, 79.1, "H100 SXM", 989),
    ("NVIDIA H100 NVL", 132, 93.1, "H100 NVL", 835),
    ("NVIDIA H100", 114, 79.6, "H100 PCIe", 756),  # no form factor in the name: the SMs tell
    ("NVIDIA H100", 132, 93.1, "H100 NVL", 835),
    ("NVIDIA H100", 132, 79.1, "H100 SXM", 989),
    ("NVIDIA H200", 132, 139.8, "H200 SXM", 989),
    ("NVIDIA GH200 480GB", 132, 94.5, "GH200", 989),  # contains "H200": the specific name comes first
    ("NVIDIA A100-SXM4-80GB", 108, 79.2, "A100", 312),
    ("NVIDIA A100 80GB PCIe", 108, 79.2, "A100", 312),
    ("NVIDIA L40S", 142, 44.4, "L40S", 362),
    ("NVIDIA L4", 58, 22.0, "L4", 121),
    ("NVIDIA A10", 72, 22.0, "A10", 125),
    ("NVIDIA GeForce RTX 4090", 128, 23.6, "RTX 4090", 165),
])
def test_the_card_table_names_the_exact_card(name, sms, gib, label, tflops):
    card = bench.identify_card(name, sms, gib)
    assert (card.label, card.peak_flops) == (label, tflops * 1e12)


def test_an_unknown_card_reports_its_name_and_no_mfu():
    card = bench.identify_card("NVIDIA A10G", 80, 22.0)
    assert card.peak_flops is None and card.label == "NVIDIA A10G"
    cfg = bench.PRESETS["smoke"]
    row = {"row": "lora", "status": "ok", "mfu": None, "precision": "bf16"}
    table = bench.markdown_table(card, cfg, [row])
    assert "NVIDIA A10G" in table and "peak unknown" in table
    assert re.search(r"\| - \|", table.splitlines()[-1])


def test_peak_memory_is_reset_before_every_row(monkeypatch):
    """The LoRA row after full_ft reports its own peak, not full_ft's (fake CUDA allocator)."""
    gib = 2**30
    mem = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench.gc, "collect", lambda: 0)  # a full collection of pytest's heap: seconds
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    uses = {"full_ft": 20 * gib, "lora": 6 * gib}

    def fake_bench_method(name, *args, **kwargs):
        mem["peak"] = max(mem["peak"], uses[name])
        return {"method": name}

    monkeypatch.setattr(bench, "bench_method", fake_bench_method)
    specs = [bench.RowSpec("full_ft", "full_ft"), bench.RowSpec("lora", "lora")]
    rows = bench.run_suite(bench.PRESETS["smoke"], torch.device("cuda", 0), specs)
    assert [(r["row"], r["peak_memory_gib"], r["peak_memory_kind"]) for r in rows] == [
        ("full_ft", 20.0, "cuda_allocated"), ("lora", 6.0, "cuda_allocated")]


def test_a_failed_row_is_reported_and_the_others_still_run(monkeypatch):
    monkeypatch.setattr(bench.gc, "collect", lambda: 0)
    def fake(cfg, spec, device):
        if spec.method == "full_ft":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")
        return {"step_time_s": 1.0}

    specs = [bench.RowSpec("full_ft", "full_ft"), bench.RowSpec("lora", "lora")]
    rows = bench.run_suite(bench.PRESETS["smoke"], torch.device("cpu"), specs, local=fake)
    assert rows[0]["status"] == "failed: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert rows[1]["status"] == "ok" and rows[1]["step_time_s"] == 1.0


@pytest.mark.slow
def test_the_two_rank_row_runs_under_torchrun_and_reports_both_ranks():
    """The 2-GPU row's plumbing (torchrun command line, rank 0's JSON row), on CPU with gloo."""
    cfg = bench.PRESETS["smoke"]
    row = bench.run_with_torchrun(cfg, bench.RowSpec("lora, 2 GPUs (ddp)", "lora", ranks=2))
    assert row["ranks"] == 2 and row["strategy"] == "ddp"
    assert row["tokens_per_step_per_rank"] == cfg.max_tokens
    assert row["train_tokens_per_s_total"] == pytest.approx(2 * row["train_tokens_per_s_per_rank"], rel=0.2)


@pytest.mark.parametrize("python, fakes, expected", [
    ("mypython -X importtime", ["uv", "python3"], "mypython -X importtime scripts/bench.py --suite --smoke"),
    (None, ["uv", "python3"], "uv run --frozen python scripts/bench.py --suite --smoke"),
    (None, ["python3"], "python3 scripts/bench.py --suite --smoke"),
])
def test_the_script_runs_the_given_python_else_uv_else_python3(tmp_path, python, fakes, expected):
    """A GPU node without uv still runs the bench (fake executables print how they were called)."""
    for name in {*fakes, "mypython"}:
        exe = tmp_path / name
        exe.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        exe.chmod(0o755)
    if "uv" not in fakes:
        (tmp_path / "uv").unlink(missing_ok=True)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "HOME": str(tmp_path)}
    if python:
        env["PYTHON"] = str(tmp_path / python.split()[0]) + " " + " ".join(python.split()[1:])
    done = subprocess.run(["bash", "scripts/bench_gpu.sh", "--smoke"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == expected


@pytest.mark.slow  # three model builds and a transformers.Trainer: ~45 s under load on 2 cores
def test_compare_prints_ours_unpacked_packed_and_the_hf_trainer_with_ratios_and_the_floor():
    done = subprocess.run([sys.executable, "scripts/bench.py", "--compare", "--config", "configs/synthetic.yaml",
                           "--steps", "2", "--warmup", "1", "--threads", "1", "--rounds", "1"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {r["row"]: r for r in payload["compare"]}
    assert list(rows) == ["ours, unpacked", "ours, packed", "HF Trainer (stock)"]
    assert rows["ours, packed"]["tokens"] == rows["ours, unpacked"]["tokens"] > 0  # the same items
    assert rows["ours, packed"]["padding_share"] == 0 and rows["HF Trainer (stock)"]["vs_hf_trainer"] == 1
    assert payload["floor"]["floor_tokens_per_s"] > 0 and all(0 < r["of_matmul_floor"] for r in rows.values())
