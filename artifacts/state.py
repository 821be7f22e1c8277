"""Saving and loading a checkpoint's state files without ever executing code from them.

A run directory on shared scratch may have been written (or altered) by another user, and report,
landscape and lm-eval jobs read directories they did not write. A pickle can run arbitrary code when
loaded, so state files are read with ``torch.load(weights_only=True)``, whose unpickler accepts only
tensors, numbers, strings and containers of them; anything else is refused with UnsafeStateError and
nothing in the file runs. Tensors that training changes go to safetensors, which holds no code at all.

Writes serialise to bytes first and then go through ``atomic_write_bytes``: a full disk then raises
our StorageError (path and size) instead of torch's "unexpected pos" from deep inside its zip writer,
and a half-written file can never take the final name. The cost is one host copy of the state while
it is written (measured: a 256 MiB state peaks 256 MiB above itself while it is saved).

Loading always maps tensors to the CPU, whatever device they were saved from: a step checkpoint holds
AdamW moments saved from cuda:0 on rank 0, and loading them where they were saved would put every
rank's copy on GPU 0 (or fail on a node without CUDA). The code that owns the device places them:
``optimizer.load_state_dict`` moves each moment to its parameter's device, and the methods move their
stored tensors next to the parameters when they first use them.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from artifacts.atomic import StrPath, atomic_write_bytes


class UnsafeStateError(ValueError):
    """A state file that is not plain data (a pickle with code in it) or is not readable as one."""

    def __init__(self, path: StrPath, reason: str) -> None:
        self.path = Path(path)
        super().__init__(
            f"refusing to load {path}: {reason}. It is not plain tensor/number/string data as this "
            "toolkit writes it, so it was altered or written by something else; nothing in it "
            "was executed. Delete that period or checkpoint directory to redo it, or check who "
            "wrote it"
        )


def save_tensors(path: StrPath, tensors: dict[str, Any]) -> None:
    """A name -> tensor dict as safetensors, atomically."""
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def load_tensors(path: StrPath) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise UnsafeStateError(path, f"not a valid safetensors file ({exc})") from None


def save_state(path: StrPath, obj: Any) -> None:
    """Tensors, numbers, strings, None and lists/tuples/dicts of them, atomically (torch format)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())  # shares BytesIO's bytes (CPython copies nothing here)


def load_state(path: StrPath) -> Any:
    """The object ``save_state`` wrote; UnsafeStateError for anything that is not plain data."""
    import torch

    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        # torch's message names the global the pickle wanted to call ("... GLOBAL posix.system ...") on a later
        # line; its first line is a note on torch's weights_only default that suggests weights_only=False, the one
        # thing not to do with a file of unknown origin, and says nothing about this file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        named = next((line for line in lines if "GLOBAL" in line), lines[0] if lines else "unpickling refused")
        raise UnsafeStateError(path, f"it asks to run code ({named[:200]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise UnsafeStateError(path, f"unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
