"""Kill-and-resume in the middle of period 2, where lwf has a teacher and agem a memory (the contract
matrix stops runs in period 1, where both are plain LoRA): the resumed run equals the uninterrupted one,
results and every logged step (lwf_kl, agem_dot) alike."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import comparable, only_run_dir, read_results
from tests.test_method_contract import TINY
from training import cli, trainer


def _train_records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lwf", "agem"])
def test_signal_in_period_two_then_resume_equals_uninterrupted(name, tmp_path: Path, monkeypatch):
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*TINY, "--method", name, "--run-root", str(ref_root)]) == 0
    ref_dir = only_run_dir(ref_root)
    ref_steps = _train_records(ref_dir)
    num_first = sum(1 for r in ref_steps if r["period"] == 1)
    assert sum(1 for r in ref_steps if r["period"] == 2) >= 3, "period 2 needs steps on both sides of the stop"

    real_step = trainer.Trainer.train_step
    count = {"n": 0}

    def step_then_signal(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == num_first + 2:  # two steps into period 2
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_signal)
    assert cli.main([*TINY, "--method", name, "--run-root", str(root)]) == 75
    run_dir = only_run_dir(root)
    assert (run_dir / "periods" / "1-2018").exists() and not (run_dir / "periods" / "2-2020").exists()
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    assert cli.main([*TINY, "--method", name, "--run-root", str(root)]) == 0
    assert comparable(read_results(run_dir)) == comparable(read_results(ref_dir))
    assert _train_records(run_dir) == ref_steps
    stat = {"lwf": "lwf_kl", "agem": "agem_dot"}[name]
    assert any(r[stat] != 0 for r in ref_steps if r["period"] == 2), f"{stat} must be live in period 2"
