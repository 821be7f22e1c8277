"""artifacts/state.py by hand: state and tensor files round-trip, come back on the CPU, and anything that
is not plain data (a pickle that calls code, a truncated or foreign file) is refused with the path and
the reason, while a missing file stays a FileNotFoundError. The whole-run refusal is
tests/test_hardening.py::test_a_planted_pickle_is_refused_by_resume_and_every_job_and_nothing_runs
(slow); these are the fast layer's, and what scripts/mutation.py runs against artifacts/state.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from artifacts import UnsafeStateError
from artifacts.state import load_state, load_tensors, save_state, save_tensors


class _Boom:
    def __reduce__(self):
        return (os.system, ("true",))


def test_state_and_tensors_round_trip_on_the_cpu(tmp_path: Path):
    state = {"step": 3, "lr": [0.1, None], "name": "adamw", "m": torch.arange(4.0), "t": (1, 2)}
    save_state(tmp_path / "s.pt", state)
    got = load_state(tmp_path / "s.pt")
    assert got.keys() == state.keys() and torch.equal(got["m"], state["m"]) and got["t"] == (1, 2)
    assert got["lr"] == [0.1, None] and got["m"].device.type == "cpu"
    w = torch.arange(6.0).reshape(2, 3).t()  # not contiguous: saved as its values
    save_tensors(tmp_path / "w.safetensors", {"w": w})
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["w"], w)


def test_code_in_a_pickle_is_refused_naming_the_file_and_the_call(tmp_path: Path):
    path = tmp_path / "trainer_state.pt"
    torch.save({"x": _Boom()}, path)
    with pytest.raises(UnsafeStateError, match=r"it asks to run code \(") as info:
        load_state(path)
    message = str(info.value)
    assert info.value.path == path and str(path) in message and "nothing in it was executed" in message
    # the call it wanted, on one line; not torch's generic first line, which suggests weights_only=False
    assert "GLOBAL posix.system" in message and "\n" not in message and "weights_only" not in message
    assert message.endswith("It is not plain tensor/number/string data as this toolkit writes it, so it was altered "
                            "or written by something else; nothing in it was executed. Delete that period or "
                            "checkpoint directory to redo it, or check who wrote it")


def test_the_reason_is_one_line_of_at_most_200_characters_whatever_torch_says(tmp_path: Path, monkeypatch):
    import pickle

    import torch.serialization

    path = tmp_path / "s.pt"
    save_state(path, {"x": 1})
    for said, reason in (("", "unpickling refused"), ("  \n  ", "unpickling refused"),
                         ("first line\nsecond line", "first line"), ("x" * 300 + "\nmore", "x" * 200),
                         ("note\n\nTrying to load unsupported GLOBAL os.system\nmore", "Trying to load unsupported GLOBAL os.system")):
        def refuse(*args, said=said, **kwargs):
            raise pickle.UnpicklingError(said)

        monkeypatch.setattr(torch, "load", refuse)
        with pytest.raises(UnsafeStateError) as info:
            load_state(path)
        assert str(info.value).startswith(f"refusing to load {path}: it asks to run code ({reason}). It is not"), said


def test_an_unreadable_state_file_is_refused(tmp_path: Path):
    path = tmp_path / "s.pt"
    path.write_bytes(b"")
    with pytest.raises(UnsafeStateError, match=r"s\.pt: unreadable \(EOFError: "):
        load_state(path)
    path.write_bytes(b"not a zip at all")  # torch reads it as a legacy pickle and refuses it
    with pytest.raises(UnsafeStateError, match=r"s\.pt: "):
        load_state(path)


def test_a_foreign_tensor_file_is_refused_and_a_missing_one_is_not_found(tmp_path: Path):
    (tmp_path / "w.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UnsafeStateError, match="not a valid safetensors file"):
        load_tensors(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError):
        load_state(tmp_path / "absent.pt")
