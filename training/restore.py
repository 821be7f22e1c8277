"""Building a run's model and method, and loading a saved state into them: one code path for training,
resuming and the eval jobs (landscape, lm-eval), so an analysis never runs on a differently built model."""

from __future__ import annotations

from torch import nn

from data.schema import Benchmark
from training.checkpointer import load_saved_state
from training.config import RunConfig
from training.methods import METHODS, Method, MethodContext
from training.models import LoadedModel, load_model, master_weights
from training.seeding import derive_seed, seed_everything
from training.workload import Workload

__all__ = ["build_model_and_method", "load_saved_state"]  # the loader itself is in training/checkpointer.py


def build_model_and_method(cfg: RunConfig, bench: Benchmark | Workload) -> tuple[LoadedModel, Method, nn.Module]:
    """Load the model and prepare the method on it, seeded so the prepared start is reproducible."""
    loaded = load_model(cfg.model, cfg.mode, bench, cfg.seed)
    ctx = MethodContext(
        tokenizer=loaded.tokenizer,
        device=loaded.device,
        seed=cfg.seed,
        lr=cfg.train.lr,
        period_names=bench.period_names,
    )
    method = METHODS[cfg.method.name](cfg.method.options, ctx)
    seed_everything(derive_seed(cfg.seed, "prepare"))
    model = method.prepare(loaded.model).to(loaded.device)
    master_weights(model)  # what trains is float32 even on a bf16 backbone (training/models.py)
    return loaded, method, model
