"""Kill-and-resume in the middle of period 3, where ewc holds two Fisher/anchor pairs, replay a buffer of
two periods and joint two periods of items (the contract matrix stops runs in period 1, where all three
are plain LoRA): the resumed run equals the uninterrupted one, results and every logged step alike."""

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
    """Every logged step without its wall time (the one field a resumed run cannot reproduce)."""
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows if r.get("event") == "train"]


def _num_texts(run_dir: Path, period: str) -> int:
    return json.loads((run_dir / "periods" / period / "manifest.json").read_text())["train"]["num_texts"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ewc", "replay", "joint"])
def test_signal_in_period_three_then_resume_equals_uninterrupted(name, tmp_path: Path, monkeypatch):
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*TINY, "--method", name, "--run-root", str(ref_root)]) == 0
    ref_dir = only_run_dir(ref_root)
    ref_steps = _train_records(ref_dir)
    num_before = sum(1 for r in ref_steps if r["period"] < 3)
    assert sum(1 for r in ref_steps if r["period"] == 3) >= 2, "period 3 needs steps on both sides of the stop"

    real_step = trainer.Trainer.train_step
    count = {"n": 0}

    def step_then_signal(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == num_before + 1:  # one step into period 3
            os.kill(os.getpid(), signal.SIGUSR2)
        return out

    monkeypatch.setattr(trainer.Trainer, "train_step", step_then_signal)
    assert cli.main([*TINY, "--method", name, "--run-root", str(root)]) == 75
    run_dir = only_run_dir(root)
    assert (run_dir / "periods" / "2-2020").exists() and not (run_dir / "periods" / "3-2022").exists()
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    assert cli.main([*TINY, "--method", name, "--run-root", str(root)]) == 0
    assert comparable(read_results(run_dir)) == comparable(read_results(ref_dir))
    assert _train_records(run_dir) == ref_steps

    # the method was live in period 3, not plain LoRA
    extras = read_results(ref_dir)["method_extras"]
    if name == "ewc":
        assert all(r["ewc_penalty"] > 0 for r in ref_steps if r["period"] == 3)
        assert extras["2022"]["ewc_pairs"] == 3
    elif name == "replay":
        own = extras["2022"]["replay_items_seen"] - extras["2020"]["replay_items_seen"]
        mixed = min(extras["2020"]["replay_items"], round(0.25 * own))
        assert mixed > 0 and _num_texts(ref_dir, "3-2022") == own + mixed
    else:
        assert _num_texts(ref_dir, "3-2022") == extras["2022"]["joint_items"] > extras["2020"]["joint_items"]
