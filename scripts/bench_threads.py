"""How torch's CPU threads behave when the cores are shared: one forward and one generate of 32 probes.

OpenMP's wait policy is fixed when torch loads, so compare two processes:

    OMP_WAIT_POLICY=ACTIVE  uv run python scripts/bench_threads.py
    OMP_WAIT_POLICY=PASSIVE uv run python scripts/bench_threads.py

Run it with another CPU-bound process alive (e.g. a training run) to see the contended case that
docs/benchmarks.md reports; on an idle machine the policies differ little.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import ModelConfig  # noqa: E402
from training.models import cached_embedded_dir  # noqa: E402


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = cached_embedded_dir(ModelConfig())
    tok = AutoTokenizer.from_pretrained(where)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32).eval()
    batch = tok(["In 2020, the mayor of Veltrassa Kell was"] * 32, return_tensors="pt")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '<unset>')} load={os.getloadavg()[0]:.2f}")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            t = time.perf_counter()
            model(**batch)
            forward = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(**batch, max_new_tokens=11, min_new_tokens=11, do_sample=False,
                           pad_token_id=tok.pad_token_id)
            generate = time.perf_counter() - t
        print(f"threads={threads} forward_32x12_s={forward:.2f} generate_32x11_s={generate:.2f}", flush=True)


if __name__ == "__main__":
    main()
