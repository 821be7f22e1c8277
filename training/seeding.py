"""Seeds and RNG state capture, so a resumed run draws the same random numbers."""

from __future__ import annotations

import hashlib
import os
import random
from typing import Any, cast

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from the parts (python's hash() is salted per process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every generator's state as plain data (tensors, ints, tuples), so it loads with weights_only=True:
    numpy's key array becomes a tensor, since a pickled ndarray would need numpy's own unpickler."""
    # the legacy form, a tuple (numpy's stubs also allow the dict of get_state(legacy=False))
    name, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # the generator of this process's own device only (a rank draws on its GPU alone): a list of every
        # visible device's state would not restore where the resumed job sees fewer devices
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_generator_state(state["cuda"]))


def cuda_generator_state(saved: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The state to put on the current device. Checkpoints written before this took one state per visible
    device (get_rng_state_all), by rank 0, whose own device was the first: that entry is the one its
    draws advanced, and every rank resumes from it, as every rank resumes from rank 0's CPU state."""
    if isinstance(saved, (list, tuple)):
        return saved[0]
    return saved


def use_deterministic(enabled: bool) -> None:
    """CUDA's deterministic kernels for the whole process (train.deterministic), before CUDA starts:
    cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it creates its handle, and without a fixed workspace its
    split-K reductions may add in any order. Ops with no deterministic CUDA kernel warn (torch's
    UserWarning names the op) instead of failing the run. On CPU the kernels are deterministic already."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
