"""The retention track (eval.retention): held-out tasks scored at the base row and after every period,
their drops against the base row with paired bootstrap intervals, on temporal runs and streams alike."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest

from artifacts import verify_manifest
from eval_and_metrics import report
from eval_and_metrics.retention import RETENTION_FILE, load_retention, task_retention
from eval_and_metrics.scorers.base import Scorer, mean_of
from training import cli
from tests.conftest import TINY_STREAM, comparable, only_run_dir, read_results, signal_after_steps

TINY = ["--mode", "synthetic", "--set", "data.num_facts=8", "--set", "train.epochs=2",
        "--set", "train.max_batch_size=4", "--set", "train.progress=false", "--method", "lora",
        "--set", "eval.retention=retention-synthetic"]


class _Mean(Scorer):
    """A scorer whose metrics are plain means of per-item fields (what task_retention resamples)."""

    name: ClassVar[str] = "mean"
    output_type: ClassVar[str] = "multiple_choice"
    metrics: ClassVar[dict[str, bool]] = {"acc": True, "loss": False}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return {m: mean_of(rows, m) for m in self.metrics}

    def score(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        raise NotImplementedError


def _rows(acc: list[float], loss: list[float]) -> list[dict[str, Any]]:
    return [{"id": str(i), "acc": a, "loss": x} for i, (a, x) in enumerate(zip(acc, loss))]


def test_drops_hand_computed_with_paired_intervals() -> None:
    base = _rows([1, 1, 1, 0], [2.0, 2.0, 2.0, 2.0])
    after = _rows([1, 0, 1, 0], [3.0, 2.0, 2.0, 3.0])
    out = task_retention(_Mean(), [base, base, after], samples=400, seed=3)
    acc, loss = out["metrics"]["acc"], out["metrics"]["loss"]
    assert out["n"] == 4
    assert acc["per_row"] == [0.75, 0.75, 0.5]
    # higher is better: drop = base - value; lower is better: drop = value - base (positive = worse)
    assert acc["drop"] == [0.0, 0.0, 0.25] and acc["rel_drop"] == pytest.approx([0.0, 0.0, 1 / 3])
    assert loss["drop"] == [0.0, 0.0, 0.5] and loss["rel_drop"] == pytest.approx([0.0, 0.0, 0.25])
    # paired: row 1 equals the base item by item, so every resample's drop is 0
    assert acc["drop_ci"][1] == [0.0, 0.0]
    # one item of four lost: each resample's drop is (copies of item 1) / 4, between 0 and 1
    lo, hi = acc["drop_ci"][2]
    assert 0.0 <= lo <= 0.25 <= hi <= 1.0 and hi > lo
    # the base model knew items 0, 1 and 2; the last row still knows 0 and 2
    assert out["base_correct"] == 3 and out["kept_correct"] == pytest.approx([1.0, 1.0, 2 / 3])
    # seeded: the same interval every time
    assert task_retention(_Mean(), [base, base, after], samples=400, seed=3) == out


def test_rows_must_score_the_same_items() -> None:
    base = _rows([1, 0], [1.0, 1.0])
    with pytest.raises(ValueError, match="row 1 does not score the same items"):
        task_retention(_Mean(), [base, base[::-1]])


def test_a_bad_retention_file_is_one_line_per_problem_and_exit_2(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "retention.yaml"
    bad.write_text(TINY_STREAM.replace("scorer: multiple_choice", "scorer: exact_match", 1))
    code = cli.main([*TINY, "--set", f"eval.retention={bad}", "--run-root", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()
    assert load_retention("retention-synthetic").num_items() == 48


def _retention(run: Path) -> dict[str, Any]:
    return read_results(run)["metrics"]["retention"]


def test_a_temporal_run_scores_the_track_at_every_row(tmp_path: Path) -> None:
    assert cli.main([*TINY, "--run-root", str(tmp_path)]) == 0
    run = only_run_dir(tmp_path)
    ret = _retention(run)
    periods = sorted((run / "periods").iterdir())
    assert len(periods) == 5  # the base row and four periods
    for period in periods:
        assert verify_manifest(period) == (True, "ok")  # retention.jsonl is committed with the period
        rows = [json.loads(x) for x in (period / "eval" / RETENTION_FILE).read_text().splitlines()]
        assert {r["task"] for r in rows} == {"choices", "text"} and len(rows) == 48
        scores = json.loads((period / "eval" / "scores.json").read_text())
        assert set(scores["retention"]) == {"choices", "text"}
    assert ret["primary_metric"] == {"choices": "acc", "text": "nll_per_token"}
    for task in ("choices", "text"):
        entry = ret["tasks"][task]["metrics"][ret["primary_metric"][task]]
        assert len(entry["per_row"]) == 5 and entry["drop"][0] == 0.0
        assert ret["final_rel_drop"][task] == entry["rel_drop"][-1]
        lo, hi = entry["drop_ci"][-1]
        assert lo <= entry["drop"][-1] <= hi
    # the text task's perplexity moves with training (the synthetic model learns the benchmark's words),
    # so the track measures the model after each period, not the base model five times
    text = ret["tasks"]["text"]["metrics"]["nll_per_token"]["per_row"]
    assert len(set(text)) == 5 and all(math.isfinite(v) for v in text)


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_retention_and_a_stream_has_the_track(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*TINY, "--run-root", str(ref_root)]) == 0
    restore = signal_after_steps(monkeypatch, 5)
    assert cli.main([*TINY, "--run-root", str(root)]) == 75
    restore()
    assert cli.main([*TINY, "--run-root", str(root)]) == 0
    assert comparable(read_results(only_run_dir(root))) == comparable(read_results(only_run_dir(ref_root)))
    assert _retention(only_run_dir(root)) == _retention(only_run_dir(ref_root))
    # the report recomputes the track from the committed rows, gets results.json's numbers, and shows them
    run = report.read_run(only_run_dir(root))
    assert not run.warnings and run.metrics["retention"] == _retention(only_run_dir(root))
    assert report.main([str(root), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "### Retention" in summary
    line = next(x for x in summary.splitlines() if "| choices/acc |" in x)
    final = _retention(only_run_dir(root))["tasks"]["choices"]["metrics"]["acc"]["drop"][-1]
    assert f"| {final:.3f} (n=1) |" in line

    stream = tmp_path / "tiny-stream.yaml"
    stream.write_text(TINY_STREAM)
    args = ["--mode", "synthetic", "--stream", str(stream), "--method", "lora", "--set", "train.epochs=1",
            "--set", "train.progress=false", "--set", "eval.retention=retention-synthetic"]
    assert cli.main([*args, "--run-root", str(tmp_path / "stream")]) == 0
    ret = _retention(only_run_dir(tmp_path / "stream"))
    assert len(ret["tasks"]["choices"]["metrics"]["acc"]["per_row"]) == 3  # base and two tasks
