"""scripts/stream_forgetting.py: per-task forgetting of a stream run with paired item intervals, on a run
directory written by hand (numbers computed by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.command import BadInput
from scripts.stream_forgetting import main, run_forgetting


def _row(task: str, i: int, nll: float) -> dict[str, object]:
    return {"task": task, "id": f"{task}/{i}", "nll": nll, "num_tokens": 10, "num_bytes": 40, "num_words": 8}


def _stream_run(root: Path, rows: list[list[dict[str, object]]]) -> Path:
    run = root / "stream-lora-s0-abc"
    names = ["base", "z", "a"]  # trained z, then a: not the names' sorted order
    for k, (name, per_row) in enumerate(zip(names, rows)):
        (run / "periods" / f"{k}-{name}" / "eval").mkdir(parents=True)
        (run / "periods" / f"{k}-{name}" / "eval" / "predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in per_row))
    scorers = {t: {"name": "perplexity", "metrics": {"nll_per_token": False}} for t in ("a", "z")}  # sorted
    (run / "results.json").write_text(json.dumps({"method": "lora", "metrics": {"scorers": scorers}}))
    return run


def test_forgetting_is_the_rise_of_a_lower_is_better_metric_after_its_task(tmp_path: Path) -> None:
    # task z (trained first): after its own training every item has nll 10 over 10 tokens (1.0 per token); after task a
    # every item has 25 (2.5 per token): forgetting 1.5 nats per token, the same on every resample
    base = [_row("z", i, 30.0) for i in range(4)] + [_row("a", i, 30.0) for i in range(4)]
    after_a = [_row("z", i, 10.0) for i in range(4)] + [_row("a", i, 31.0) for i in range(4)]
    after_b = [_row("z", i, 25.0) for i in range(4)] + [_row("a", i, 5.0) for i in range(4)]
    found = run_forgetting(_stream_run(tmp_path, [base, after_a, after_b]))
    assert list(found["tasks"]) == ["z"]  # nothing is trained after the last task
    e = found["tasks"]["z"]["nll_per_token"]
    assert (e["after_task"], e["final"], e["forgetting"]) == (1.0, 2.5, 1.5)
    assert e["ci"] == pytest.approx([1.5, 1.5]) and found["tasks"]["z"]["n"] == 4


def test_forgetting_interval_is_over_items(tmp_path: Path) -> None:
    # item 0 rises by 4 nats per token, the others not at all: the point estimate is 1.0 (40 of 40 tokens),
    # and resamples without item 0 give 0, with it twice 2.0
    base = [_row("z", i, 30.0) for i in range(4)] + [_row("a", i, 30.0) for i in range(4)]
    after_a = [_row("z", i, 10.0) for i in range(4)] + [_row("a", i, 30.0) for i in range(4)]
    after_b = [_row("z", 0, 50.0)] + [_row("z", i, 10.0) for i in range(1, 4)] + [_row("a", i, 5.0) for i in range(4)]
    e = run_forgetting(_stream_run(tmp_path, [base, after_a, after_b]))["tasks"]["z"]["nll_per_token"]
    assert e["forgetting"] == pytest.approx(1.0)
    assert e["ci"][0] == pytest.approx(0.0) and e["ci"][1] >= 2.0


def test_a_temporal_run_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "temporalwiki-lora-s0-abc"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"metrics": {"acc_storage": 0.5}}))
    with pytest.raises(BadInput, match="not a stream run"):
        run_forgetting(run)
    assert main([str(run)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
