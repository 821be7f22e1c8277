"""The method registry: every method the toolkit can run, written out in one place.

Keys are lowercase snake case and match the module names; tests/test_registry.py checks that.
"""

from __future__ import annotations

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

__all__ = ["METHODS", "Method", "MethodContext"]
