"""The method registry: every method the toolkit can run, written out in one place.

Keys are lowercase snake case and match the module names; tests/test_registry.py checks that.
"""

from __future__ import annotations

from typing import Any

from training.methods.agem import AveragedGEM
from training.methods.base import Method, MethodContext
from training.methods.casm import ContradictionAwareSparseMemory
from training.methods.ewc import EWC
from training.methods.ewc_replay import EWCReplay
from training.methods.full_ft import FullFineTune
from training.methods.joint import Joint
from training.methods.lora import LoRA
from training.methods.lwf import LearningWithoutForgetting
from training.methods.olora import OLoRA
from training.methods.per_task import PerTask
from training.methods.replay import Replay
from training.methods.smf import SparseMemoryFinetune

METHODS: dict[str, type[Method]] = {
    "full_ft": FullFineTune,
    "lora": LoRA,
    "smf": SparseMemoryFinetune,
    "casm": ContradictionAwareSparseMemory,
    "ewc": EWC,
    "replay": Replay,
    "ewc_replay": EWCReplay,
    "lwf": LearningWithoutForgetting,
    "agem": AveragedGEM,
    "olora": OLoRA,
    # bounds: reference rows for the methods above, labelled as such in reports
    "joint": Joint,
    "per_task": PerTask,
}


def capability_problems(cfg: Any, kind: str | None = None, strategy: str | None = None) -> list[str]:
    """The one check of a run configuration against what its method declares it supports (the class
    attributes of training/methods/base.py Method): one line per refusal. `kind` is the workload's kind of
    benchmark and `strategy` the resolved train.strategy (training/strategies.py resolve_strategy); None
    skips that check (an unknown strategy is strategy_problems' to report)."""
    name = cfg.method.name
    method = METHODS[name]
    problems = []
    if kind is not None and kind not in method.benchmarks:
        problems.append(
            f"method.name {name!r} runs only on {', '.join(method.benchmarks)} benchmarks, not on a "
            f"{kind}; valid here: {', '.join(n for n, m in METHODS.items() if kind in m.benchmarks)}"
        )
    if strategy is not None and strategy not in method.strategies:
        problems.append(
            f"train.strategy {strategy} runs only "
            f"{', '.join(n for n, m in METHODS.items() if strategy in m.strategies)}, not method "
            f"{name!r}: its trainable state is small enough to replicate, use train.strategy ddp"
        )
    if cfg.train.gradient_checkpointing and not method.gradient_checkpointing:
        problems.append(
            f"train.gradient_checkpointing cannot be used with method {name!r}: it counts memory reads "
            f"in the forward, which checkpointing runs twice; valid: false"
        )
    if cfg.train.pack and not method.packs:
        problems.append(
            f"train.pack cannot be used with method {name!r}: it reads the training batch per row or "
            f"per sequence, which packing changes; valid: false (methods that pack: "
            f"{', '.join(n for n, m in METHODS.items() if m.packs)})"
        )
    # 4-bit packs the backbone's weights into frozen NF4 bytes: refuse a configuration that would train them
    # (full_ft, or a regulariser with `on: full`), asked of the method for these very options
    if cfg.model.quantize == "4bit" and method.trains_backbone(cfg.method.options):
        what = f"method {name!r}" + (f" with on: {cfg.method.options.on}" if hasattr(cfg.method.options, "on") else "")
        problems.append(
            f"model.quantize 4bit freezes the backbone in NF4, so {what} (which trains the backbone's "
            f"weights) cannot run on it; valid with 4bit: an adapter or memory method such as lora, or "
            f"on: lora"
        )
    return problems


__all__ = ["METHODS", "Method", "MethodContext", "capability_problems"]
