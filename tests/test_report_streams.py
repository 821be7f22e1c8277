"""The report and `main.py status` over real task-stream runs: 2 methods x 2 seeds of a tiny generated stream
(multiple choice, a perplexity task, numeric answers), trained in-process once, plus a partial and a corrupted
copy. Every expected number is computed here from the runs' own results.json, never by the report's code."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from artifacts import read_manifest, write_manifest
from eval_and_metrics import report
from scripts import status
from tests.test_report import T_975, _chromium

TASKS = ["mc", "style", "math"]  # the perplexity task is not last, so its BWT and forgetting are defined
STREAM_YAML = """\
name: tiny-stream
tasks:
  - name: mc
    source: {type: generated, domain: multiple_choice, num_train: 8, num_eval: 6}
    scorer: multiple_choice
    train_split: train
    eval_split: test
  - name: style
    source: {type: generated, domain: style, num_train: 8, num_eval: 6}
    scorer: perplexity
    train_split: train
    eval_split: test
    loss_on: all
  - name: math
    source: {type: generated, domain: math, num_train: 8, num_eval: 6}
    scorer: numeric
    train_split: train
    eval_split: test
"""
SETS = ("train.epochs=2", "train.lr=0.01", "train.progress=false", "model.synthetic_hidden_size=32",
        "model.synthetic_layers=1", "train.threads=1", "checkpoint.every_seconds=0", "eval.batch_size=16")
BENCH = "tiny-stream (stream, order 0)"
HIGHER = ["ACC (macro) ↑", "ACC micro ↑", "avg ACC over time ↑", "BWT ↑", "FWT ↑", "forgetting ↓", "max drop ↓",
          "FG% ↓", "plasticity ↑"]
HIGHER_KEYS = ["acc", "acc_micro", "avg_acc_over_time", "bwt", "fwt", "forgetting", "max_drop", "fg_pct",
               "plasticity"]
LOWER = ["final nll_per_token ↓", "nll_per_token BWT ↓", "nll_per_token forgetting ↓",
         "nll_per_token learning ↓"]
LOWER_KEYS = ["final", "bwt", "forgetting", "learning"]


def _runs(root: Path) -> dict[tuple[str, int], Path]:
    out = {}
    for run in sorted(p for p in root.iterdir() if (p / "config.yaml").is_file()):
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        out[(cfg["method"]["name"], cfg["seed"])] = run
    return out


@pytest.fixture(scope="module")
def stream_sweep(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Four complete stream runs, a partial copy (last task and results.json gone) and a corrupted copy (one
    flipped bit in a committed predictions file), and the report over all six."""
    from training.cli import main as train_main

    base = tmp_path_factory.mktemp("stream-sweep")
    stream_file = base / "tiny.yaml"
    stream_file.write_text(STREAM_YAML)
    root = base / "runs"
    for seed in (0, 1):
        argv = ["--mode", "synthetic", "--stream", str(stream_file), "--method", "lora,full_ft", "--seed", str(seed),
                "--run-root", str(root)]
        for item in SETS:
            argv += ["--set", item]
        assert train_main(argv) == 0
    runs = _runs(root)
    assert len(runs) == 4
    partial = root / (runs[("lora", 1)].name + "-partial")
    shutil.copytree(runs[("lora", 1)], partial)
    shutil.rmtree(partial / "periods" / "3-math")  # as if killed while training the last task
    (partial / "results.json").unlink()
    corrupted = root / (runs[("full_ft", 0)].name + "-corrupted")
    shutil.copytree(runs[("full_ft", 0)], corrupted)
    target = corrupted / "periods" / "2-style" / "eval" / "predictions.jsonl"
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01  # same size: only the checksum can tell
    target.write_bytes(bytes(data))
    out = base / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    return {"root": root, "out": out, "runs": runs, "partial": partial, "corrupted": corrupted,
            "results": {key: json.loads((run / "results.json").read_text()) for key, run in runs.items()}}


def _cell(values: list[float | None], group_n: int = 2) -> str:
    """report.fmt by hand: mean ± t_{0.975,n-1} sd / sqrt(n), '(n=k)' when k differs from the group's n or k = 1."""
    xs = [v for v in values if v is not None]
    if not xs:
        return "–"
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return f"{mean:.3f} (n=1)"
    sd = math.sqrt(sum((v - mean) ** 2 for v in xs) / (n - 1))
    return f"{mean:.3f} ± {T_975[n - 1] * sd / math.sqrt(n):.3f}" + ("" if n == group_n else f" (n={n})")


def _tables(section: str) -> list[list[list[str]]]:
    """Every markdown table of a summary.md section as rows of cells (header first)."""
    tables, current = [], []
    for line in section.splitlines() + [""]:
        if line.startswith("|---"):
            continue  # the header separator
        if line.startswith("| "):
            current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def _stream_section(out: Path) -> str:
    summary = (out / "summary.md").read_text()
    assert summary.count(f"## {BENCH}") == 1, "one section (and so one set of tables) per stream"
    return summary.split(f"## {BENCH}")[1].split("\n## ")[0]


def test_stream_runs_are_read_with_statuses_as_for_temporal_runs(stream_sweep: dict) -> None:
    result = json.loads((stream_sweep["out"] / "results.json").read_text())
    assert result["counts"] == {"complete": 4, "running": 0, "partial": 1, "corrupted": 1, "failed": 0}
    by_id = {r["run_id"]: r for r in result["runs"]}
    for run in stream_sweep["runs"].values():
        got = by_id[run.name]
        assert got["status"] == "complete" and got["kind"] == "stream" and got["periods"] == TASKS
        assert got["warnings"] == [], "the re-derived metrics must equal what training wrote"
    partial = by_id[stream_sweep["partial"].name]
    assert partial["status"] == "partial" and partial["reason"].startswith("2 of 3 tasks committed"), partial
    assert "last log event: eval task 3 (math)" in partial["reason"]
    corrupted = by_id[stream_sweep["corrupted"].name]
    assert corrupted["status"] == "corrupted"
    assert "periods/2-style: sha256 mismatch for eval/predictions.jsonl" in corrupted["reason"]
    attention = (stream_sweep["out"] / "summary.md").read_text().split("## Runs not in the aggregates")[1]
    assert stream_sweep["partial"].name in attention and stream_sweep["corrupted"].name in attention
    groups = {g["method"]: g for g in result["groups"]}
    assert set(groups) == {"full_ft", "lora"}
    for g in groups.values():
        assert g["kind"] == "stream" and g["benchmark"] == BENCH and g["seeds"] == [0, 1] and g["n"] == 2
        assert g["stream"]["tasks"] == TASKS and g["stream"]["higher_is_better"]["style"] is False
    assert len(groups["lora"]["runs"]) == 3 and len(groups["full_ft"]["runs"]) == 3  # damaged copies listed


def test_one_stream_table_per_summary_with_the_mean_of_the_runs(stream_sweep: dict) -> None:
    higher, lower, per_task = _tables(_stream_section(stream_sweep["out"]))
    prefix = ["method", "n", "seeds", "not complete"]
    assert higher[0] == prefix + HIGHER
    assert lower[0] == prefix + LOWER
    assert all(h.endswith("↓") for h in lower[0][len(prefix):]), "every lower-is-better column is marked"
    results = stream_sweep["results"]
    for table, summary, keys in ((higher, "higher_is_better_summary", HIGHER_KEYS),
                                 (lower, "lower_is_better_summary", LOWER_KEYS)):
        rows = {r[0]: dict(zip(table[0], r)) for r in table[1:]}
        assert set(rows) == {"full_ft", "lora"}
        for method, row in rows.items():
            assert (row["n"], row["seeds"], row["not complete"]) == ("2", "0,1", "1")
            for column, key in zip(table[0][len(prefix):], keys):
                values = [results[(method, s)]["metrics"][summary][key] for s in (0, 1)]
                assert row[column] == _cell(values), (method, column)
    # the lower-is-better numbers never enter the higher-is-better summary: ACC is over mc and math only
    for (method, seed), res in results.items():
        m = res["metrics"]
        assert m["higher_is_better_summary"]["acc"] == pytest.approx((m["matrix"][3][0] + m["matrix"][3][2]) / 2)

    assert per_task[0] == ["task", "scorer", "primary metric", "full_ft", "lora"]
    assert [r[:3] for r in per_task[1:]] == [["mc", "multiple_choice", "acc ↑"], ["style", "perplexity",
                                             "nll_per_token ↓"], ["math", "numeric", "numeric_match ↑"]]
    for j, row in enumerate(per_task[1:]):
        for method, cell in zip(("full_ft", "lora"), row[3:]):
            finals = [results[(method, s)]["metrics"]["matrix"][3][j] for s in (0, 1)]
            solved = sum(TASKS[j] in results[(method, s)]["metrics"]["base_solved"] for s in (0, 1))
            assert cell == _cell(finals) + (f" †{solved}/2" if solved else ""), (method, TASKS[j])
    if any(res["metrics"]["base_solved"] for res in results.values()):
        assert "†k/n: base-solved in k of the method's n complete runs" in _stream_section(stream_sweep["out"])


def test_report_json_and_csv_carry_the_stream_aggregates(stream_sweep: dict) -> None:
    result = json.loads((stream_sweep["out"] / "results.json").read_text())
    results = stream_sweep["results"]
    for g in result["groups"]:
        runs = [results[(g["method"], s)]["metrics"] for s in (0, 1)]
        acc = g["metrics"]["lower_is_better_summary.final"]
        assert acc["mean"] == pytest.approx(sum(m["lower_is_better_summary"]["final"] for m in runs) / 2)
        assert g["stream"]["matrix_mean"][1][1] == pytest.approx(sum(m["matrix"][1][1] for m in runs) / 2)
        assert g["matrix_storage_em_mean"] is None  # a stream's matrix is not EM
    with open(stream_sweep["out"] / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == report.CSV_COLUMNS
    keys = [(r["run_id"], r["period_index"], r["scope"], r["probe_period"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "one row per run x period x metric"
    run = stream_sweep["runs"][("lora", 0)]
    matrix = results[("lora", 0)]["metrics"]["matrix"]
    primary = {"mc": "acc", "style": "nll_per_token", "math": "numeric_match"}
    cells = {(int(r["period_index"]), r["probe_period"]): float(r["value"]) for r in rows
             if r["run_id"] == run.name and r["scope"] == "cell" and r["metric"] == primary[r["probe_period"]]}
    assert cells == {(k, t): pytest.approx(matrix[k][j]) for k in range(4) for j, t in enumerate(TASKS)}
    acc = [r for r in rows if r["metric"] == "higher_is_better_summary.acc" and r["scope"] == "run"]
    assert len(acc) == 4 and all(r["status"] == "complete" and r["benchmark"] == BENCH for r in acc)


def test_plots_for_streams(stream_sweep: dict) -> None:
    result = json.loads((stream_sweep["out"] / "results.json").read_text())
    names = {Path(p).name.split("-", 1)[1] for p in result["plots"][BENCH]}
    assert {"tiny-stream__stream__order_0_-matrix.png", "tiny-stream__stream__order_0_-task_curves.png"} <= names
    for rel in result["plots"][BENCH]:
        assert (stream_sweep["out"] / rel).stat().st_size > 5_000


def _reseal(period: Path) -> None:
    """Re-write a period's manifest over its current files, keeping its fields: a change only results.json
    (outside every manifest) can still tell."""
    fields = {k: v for k, v in (read_manifest(period) or {}).items() if k not in ("schema_version", "written_at",
                                                                                  "files")}
    write_manifest(period, fields)


def test_a_changed_prediction_is_flagged_and_a_missing_one_fails_the_run(stream_sweep: dict, tmp_path: Path) -> None:
    src = stream_sweep["runs"][("lora", 0)]
    changed = shutil.copytree(src, tmp_path / "changed")
    preds = changed / "periods" / "3-math" / "eval" / "predictions.jsonl"
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    flip = next(r for r in rows if r["task"] == "math")
    flip["numeric_match"] = 1.0 - flip["numeric_match"]
    preds.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    _reseal(preds.parent.parent)
    run = report.read_run(changed)
    assert run.status == "complete"  # the files verify; the committed predictions are what counts
    assert any(w.startswith("results.json disagrees with the committed predictions (used the latter): ")
               and "higher_is_better_summary.acc" in w for w in run.warnings), run.warnings
    assert any("periods/3-math/eval/scores.json disagrees" in w for w in run.warnings), run.warnings
    saved = json.loads((src / "results.json").read_text())["metrics"]["higher_is_better_summary"]["acc"]
    # one of math's 6 items flipped: math's final score moves by 1/6, the macro ACC over (mc, math) by 1/12
    assert abs(run.metrics["higher_is_better_summary"]["acc"] - saved) == pytest.approx(1 / 12)

    missing = shutil.copytree(src, tmp_path / "missing")
    preds = missing / "periods" / "1-mc" / "eval" / "predictions.jsonl"
    preds.write_text("".join(line + "\n" for line in preds.read_text().splitlines()[1:]))
    _reseal(preds.parent.parent)
    run = report.read_run(missing)
    assert run.status == "failed"
    assert "periods/1-mc/eval/predictions.jsonl: task 'mc': 1 eval item(s) without a prediction" in run.reason


def test_status_shows_a_stream_runs_progress(stream_sweep: dict) -> None:
    statuses = {st.run_id: st for st in status.scan(stream_sweep["root"])}
    partial = statuses[stream_sweep["partial"].name]
    assert (partial.kind, partial.state, partial.periods_done, partial.periods_total) == ("stream", "partial", 2, 3)
    assert partial.current == "math" and partial.last_event == "eval task 3 (math)"
    complete = statuses[stream_sweep["runs"][("lora", 0)].name]
    assert (complete.state, complete.periods_done, complete.periods_total) == ("complete", 3, 3)
    table = status.format_table(list(statuses.values()))
    assert re.search(rf"{re.escape(partial.run_id)}\s+partial\s+2/3 tasks", table)
    assert (f"{partial.run_id}: stream tiny-stream: 2 of 3 tasks committed (mc, style); stopped in math "
            "(task 3 of 3); last event: eval task 3 (math)") in table
    as_json = partial.to_json()
    assert as_json["kind"] == "stream" and as_json["tasks"] == TASKS


def test_the_report_reads_streams_without_importing_training(stream_sweep: dict) -> None:
    """The layers flow data -> eval_and_metrics -> training: the report re-derives a stream run without it."""
    code = ("import sys; from pathlib import Path; from eval_and_metrics import report; "
            f"run = report.read_run(Path({str(stream_sweep['runs'][('lora', 0)])!r})); "
            "assert run.status == 'complete' and not run.warnings, (run.status, run.reason, run.warnings); "
            "bad = sorted(m for m in sys.modules if m == 'training' or m.startswith('training.')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.chromium
def test_stream_report_html_renders_in_headless_chromium(stream_sweep: dict, tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium binary (apt-get install chromium)")
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    page = (stream_sweep["out"] / "report.html").resolve()
    html = page.read_text()
    assert "Lower-is-better tasks (style): nll_per_token" in html and "final nll_per_token ↓" in html
    assert "Final score per task" in html
    flags = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False)
    counts = re.search(r'data-images-ok="(\d+)/(\d+)"', dom.stdout)
    assert counts, f"page script did not run: {dom.stderr[-500:]}"
    assert counts.group(1) == counts.group(2) and int(counts.group(2)) >= 2, counts.group(0)
