#!/usr/bin/env bash
# The GPU measurement of issue 13, one short script (a few minutes on one H100/H200-class GPU; nothing is
# fetched: a 1B-class Llama with random weights and the generated benchmark). Prints one JSON row per
# measurement; docs/benchmarks.md records them with this command.
#
#   bash scripts/bench_gpu.sh              # in the project environment (uv run / the venv's python)
#   PYTHON=python bash scripts/bench_gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-uv run --frozen python}"
ONE_B=(--mode synthetic --hidden 2048 --layers 20 --heads 16 --steps 10 --max-tokens 16384 --seq-len 512 --eval-probes 0)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY scripts/bench.py "${ONE_B[@]}" --dtype bfloat16 --methods full_ft,lora
$PY scripts/bench.py "${ONE_B[@]}" --dtype bfloat16 --methods full_ft,lora --gradient-checkpointing
$PY scripts/bench.py "${ONE_B[@]}" --quantize 4bit --methods lora 2>&1 | tail -n 1 || echo '{"qlora": "failed (bitsandbytes missing?)"}'
