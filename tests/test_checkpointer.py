"""The checkpointer (training/checkpointer.py): a save then a load gives every part back, the files are
the ones every run directory holds, and a missing part fails as the loaders always did."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from artifacts import load_state, load_tensors
from training.checkpointer import (METHOD_FILE, TRAINABLE_FILE, TRAINER_FILE, Checkpointer, Position,
                                   load_saved_state)
from training.distributed import World
from training.strategies import Single


class Counting:
    """A method as the checkpointer sees it: a trainable linear layer and a state of its own."""

    name = "counting"

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {"periods": 0, "keys": torch.zeros(3)}

    def trainable_state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(state[n])

    def state_dict(self) -> dict[str, Any]:
        return {"periods": self.seen["periods"], "keys": self.seen["keys"].clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = {"periods": state["periods"], "keys": state["keys"].clone()}


def _training(seed: int) -> tuple[torch.nn.Module, Counting, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return model, Counting(), optimizer, scheduler


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    optimizer.zero_grad()
    model(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()
    scheduler.step()


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def _saved_step(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A step checkpoint of a model trained two steps, and what each part held when it was saved."""
    model, method, optimizer, scheduler = _training(seed=0)
    for _ in range(2):
        _step(model, optimizer, scheduler)
    method.seen = {"periods": 3, "keys": torch.tensor([1.0, 2.0, 3.0])}
    pos = Position(epoch=1, batch=4, step=2, tokens=77)
    ckpt = Checkpointer(Single(World(), torch.device("cpu")), method, model)  # type: ignore[arg-type]
    snapshot = ckpt.snapshot(ckpt.step_parts(optimizer, scheduler, pos))
    directory = tmp_path / "step"
    directory.mkdir()
    Checkpointer.write(directory, snapshot)
    expected = {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "method": method.state_dict(), "position": vars(pos).copy(), "draws": _draws()}
    return directory, expected


def test_a_saved_step_loads_back_every_part(tmp_path: Path) -> None:
    directory, expected = _saved_step(tmp_path)
    model, method, optimizer, scheduler = _training(seed=1)  # other weights, a fresh optimizer and method
    pos = Position()
    random.random(), np.random.rand(), torch.rand(5)  # the generators moved on since the save
    ckpt = Checkpointer(Single(World(), torch.device("cpu")), method, model)  # type: ignore[arg-type]
    ckpt.load(directory, ckpt.step_parts(optimizer, scheduler, pos))

    assert all(torch.equal(p, expected["weights"][n]) for n, p in model.named_parameters())
    assert method.seen["periods"] == 3 and torch.equal(method.seen["keys"], expected["method"]["keys"])
    assert vars(pos) == expected["position"]
    assert scheduler.state_dict() == expected["scheduler"]
    got, want = optimizer.state_dict(), expected["optimizer"]
    assert got["param_groups"] == want["param_groups"]
    assert all(torch.equal(got["state"][i][k], v) for i, s in want["state"].items() for k, v in s.items())
    assert _draws() == expected["draws"]  # the RNG continues where the saved run was


def test_the_files_and_their_keys_are_the_run_directory_format(tmp_path: Path) -> None:
    directory, _ = _saved_step(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == sorted([TRAINABLE_FILE, METHOD_FILE, TRAINER_FILE])
    assert sorted(load_tensors(directory / TRAINABLE_FILE)) == ["bias", "weight"]
    assert list(load_state(directory / TRAINER_FILE)) == ["optimizer", "scheduler", "rng", "position"]
    model, method, _, _ = _training(seed=0)
    ckpt = Checkpointer(Single(World(), torch.device("cpu")), method, model)  # type: ignore[arg-type]
    period = ckpt.snapshot(ckpt.period_parts())
    assert list(period["trainer"]) == ["rng", "position"] and period["trainer"]["position"] == "done"


@pytest.mark.parametrize("missing", [TRAINABLE_FILE, METHOD_FILE, TRAINER_FILE])
def test_a_missing_part_is_not_found_naming_its_file(tmp_path: Path, missing: str) -> None:
    directory, _ = _saved_step(tmp_path)
    (directory / missing).unlink()
    model, method, optimizer, scheduler = _training(seed=1)
    ckpt = Checkpointer(Single(World(), torch.device("cpu")), method, model)  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=f"No such file or directory: '?{directory / missing}'?$"):
        ckpt.load(directory, ckpt.step_parts(optimizer, scheduler, Position()))
    if missing != TRAINER_FILE:  # the eval jobs' loader reads the same two files the same way
        with pytest.raises(FileNotFoundError, match=f"No such file or directory: '?{directory / missing}'?$"):
            load_saved_state(method, model, directory)  # type: ignore[arg-type]
