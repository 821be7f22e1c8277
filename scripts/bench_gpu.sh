#!/usr/bin/env bash
# The GPU table of docs/benchmarks.md, one script: full_ft and lora in bf16 (checkpointing off and on),
# QLoRA (4-bit), and full_ft and lora on 2 GPUs when two are visible; a 1B-class Llama with random
# weights and the generated benchmark, so nothing is fetched (a few minutes on one H100-class GPU).
# Writes runs/bench_gpu/bench_gpu.md and bench_gpu.json (--out DIR elsewhere; a relative DIR is taken from
# the repository root) and prints the table.
#
#   bash scripts/bench_gpu.sh                 # on a GPU node
#   bash scripts/bench_gpu.sh --smoke         # the same rows on CPU with a tiny model, in seconds (the test)
#   PYTHON=/path/to/python bash scripts/bench_gpu.sh
#
# Python: $PYTHON if set (split on spaces, so "python -X importtime" works), else the project's
# environment through `uv run --frozen` when uv is installed, else python3. Needs torch, transformers,
# peft and accelerate (bitsandbytes for the 4-bit row, which is skipped without it).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -n "${PYTHON:-}" ]]; then
    read -r -a PY <<< "$PYTHON"
elif command -v uv > /dev/null 2>&1 && [[ -f uv.lock ]]; then
    PY=(uv run --frozen python)
else
    PY=(python3)
fi
# spinning OpenMP workers make torch many times slower as soon as anything else shares the cores
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
exec "${PY[@]}" scripts/bench.py --suite "$@"
