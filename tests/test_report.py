"""The report over a real synthetic sweep: every output, statuses with reasons, CIs by hand, HTML in Chromium."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from artifacts import commit_dir, staging_dir, verify_manifest
from eval_and_metrics import report
from tests.fixtures.sweep import copy_sweep, pristine_sweep, runs_by_method_seed  # noqa: F401

# t_{0.975, df} from a printed t-table, so the CI check does not reuse scipy like the code under test.
T_975 = {1: 12.706204736174703, 2: 4.302652729911275, 3: 3.182446305284263}


@pytest.fixture(scope="module")
def damaged_sweep(pristine_sweep: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """The sweep with lora s2 partial, full_ft s1 corrupted, one unreadable run and an in-flight temp dir."""
    root = copy_sweep(pristine_sweep, tmp_path_factory.mktemp("damaged") / "runs")
    runs = runs_by_method_seed(root)
    partial = runs[("lora", 2)]
    last = max((partial / "periods").iterdir())
    shutil.rmtree(last)  # as if killed during the last period
    (partial / "results.json").unlink()
    corrupted = runs[("full_ft", 1)]
    target = corrupted / "periods" / "2-2020" / "eval" / "predictions.jsonl"
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01  # one flipped bit, same size: only the checksum can tell
    target.write_bytes(bytes(data))
    broken = root / "broken-run"
    broken.mkdir()
    (broken / "config.yaml").write_text("mode: synthetic\nmethod: [unclosed\n")
    # A writer's in-flight staging dir and a half-written period must be ignored, not reported.
    complete = runs[("lora", 0)]
    inflight = complete / "periods" / ".tmp-4-2024-999-abc"
    inflight.mkdir()
    (inflight / "junk").write_text("half written")
    out = root.parent / "report"
    rc = report.main([str(root), "--out", str(out)])
    assert rc == 0
    return {"root": root, "out": out, "runs": runs, "partial": partial, "corrupted": corrupted, "broken": broken}


def test_every_output_is_written(damaged_sweep: dict) -> None:
    out = damaged_sweep["out"]
    for name in ("summary.md", "results.csv", "results.json", "report.html", "manifest.json"):
        assert (out / name).is_file(), name
    assert verify_manifest(out) == (True, "ok")
    plots = {p.name.split("-", 2)[-1] for p in (out / "plots").glob("*.png")}
    assert {"summary.png", "matrix.png", "timelines.png", "final.png", "forgetting.png",
            "plasticity_stability.png"} <= plots
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".tmp-")], "staging dir left behind"


def test_statuses_and_reasons(damaged_sweep: dict) -> None:
    result = json.loads((damaged_sweep["out"] / "results.json").read_text())
    by_id = {r["run_id"]: r for r in result["runs"]}
    assert result["counts"] == {"complete": 4, "running": 0, "partial": 1, "corrupted": 1, "failed": 1}
    partial = by_id[damaged_sweep["partial"].name]
    assert partial["status"] == "partial"
    assert partial["reason"].startswith("3 of 4 periods committed")
    corrupted = by_id[damaged_sweep["corrupted"].name]
    assert corrupted["status"] == "corrupted"
    assert "periods/2-2020: sha256 mismatch for eval/predictions.jsonl" in corrupted["reason"]
    broken = by_id["broken-run"]
    assert broken["status"] == "failed" and "unreadable" in broken["reason"]
    assert by_id[damaged_sweep["runs"][("lora", 0)].name]["status"] == "complete"  # .tmp- dir ignored
    summary = (damaged_sweep["out"] / "summary.md").read_text()
    for run_id in (partial["run_id"], corrupted["run_id"], "broken-run"):
        assert run_id in summary.split("## Runs not in the aggregates")[1]


def test_groups_use_only_complete_runs(damaged_sweep: dict) -> None:
    result = json.loads((damaged_sweep["out"] / "results.json").read_text())
    groups = {g["method"]: g for g in result["groups"]}
    assert set(groups) == {"full_ft", "lora"}
    assert groups["full_ft"]["seeds"] == [0, 2] and groups["lora"]["seeds"] == [0, 1]
    assert len(groups["lora"]["runs"]) == 3  # the partial run is listed with its group, not averaged


def _hand_acc(run: Path) -> float:
    """Storage ACC by hand: final row, mean EM over each period's storage probes, averaged over periods."""
    bench = json.loads((run / "data" / "benchmark.json").read_text())
    last = run / "periods" / f"{len(bench['periods'])}-{bench['periods'][-1]['name']}"
    em = {}
    for line in (last / "eval" / "predictions.jsonl").read_text().splitlines():
        row = json.loads(line)
        em[row["id"]] = row["em"]
    per_period = []
    for period in bench["periods"]:
        scores = [em[p["id"]] for p in period["probes"] if p["family"] == "storage"]
        per_period.append(sum(scores) / len(scores))
    return sum(per_period) / len(per_period)


def _hand_cell(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return f"{mean:.3f} ± {T_975[n - 1] * sd / math.sqrt(n):.3f}"


def _summary_rows(summary: str) -> dict[str, dict[str, str]]:
    lines = [ln for ln in summary.splitlines() if ln.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("full_ft", "lora"):
            rows[cells[0]] = dict(zip(head, cells))
    return rows


def test_summary_ci_equals_hand_computation(damaged_sweep: dict) -> None:
    rows = _summary_rows((damaged_sweep["out"] / "summary.md").read_text())
    runs = damaged_sweep["runs"]
    complete = {"full_ft": [runs[("full_ft", 0)], runs[("full_ft", 2)]],
                "lora": [runs[("lora", 0)], runs[("lora", 1)]]}
    columns = {"final ACC storage ↑": "acc_storage", "BWT storage ↑": "bwt_storage",
               "forgetting storage ↓": "forgetting_storage", "plasticity storage ↑": "plasticity_storage_pooled",
               "plasticity extraction ↑": "plasticity_extraction_pooled",
               "stability extraction ↑": "stability_extraction_pooled", "final ACC extraction ↑": "acc_extraction"}
    for method, method_runs in complete.items():
        assert rows[method]["n"] == "2"
        assert rows[method]["final ACC storage ↑"] == _hand_cell([_hand_acc(r) for r in method_runs])
        for column, key in columns.items():
            values = [json.loads((r / "results.json").read_text())["metrics"][key] for r in method_runs]
            assert rows[method][column] == _hand_cell(values), (method, column)


def test_mean_ci_by_hand() -> None:
    agg = report.mean_ci([0.5, 0.75, 1.0, None])
    assert agg["n"] == 3 and agg["mean"] == pytest.approx(0.75)
    assert agg["half"] == pytest.approx(4.302652729911275 * 0.25 / math.sqrt(3))
    assert report.fmt(agg, 3) == "0.750 ± 0.621"
    assert report.fmt(report.mean_ci([0.4]), 1) == "0.400 (n=1)"
    assert report.fmt(report.mean_ci([]), 0) == "–"


def test_forgetting_curve_ends_at_the_forgetting_metric(damaged_sweep: dict) -> None:
    result = json.loads((damaged_sweep["out"] / "results.json").read_text())
    for run in result["runs"]:
        if run["status"] == "complete":
            m = run["metrics"]
            assert report.forgetting_curve(m["matrix_storage_em"])[-1] == pytest.approx(m["forgetting_storage"])


def test_results_csv_is_tidy(damaged_sweep: dict) -> None:
    with open(damaged_sweep["out"] / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == report.CSV_COLUMNS
    keys = [(r["run_id"], r["period_index"], r["scope"], r["probe_period"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)), "one row per run x period x metric"
    by_run = {r["run_id"] for r in rows}
    assert damaged_sweep["partial"].name in by_run  # its committed rows are still data
    acc = [r for r in rows if r["metric"] == "acc_storage" and r["scope"] == "run"]
    assert {r["metric"] for r in rows if r["scope"] == "cell"} >= {"storage_em", "extraction_em", "storage_logprob"}
    assert len(acc) == 4 and all(r["status"] == "complete" for r in acc)


def test_refuses_to_replace_a_foreign_directory(pristine_sweep: Path, tmp_path: Path) -> None:  # noqa: F811
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert report.main([str(pristine_sweep), "--out", str(foreign)]) == 2
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_safe_while_a_writer_recommits(pristine_sweep: Path, tmp_path: Path) -> None:  # noqa: F811
    """A period dir replaced over and over (commit_dir, like a writer redoing it) is never 'corrupted'."""
    root = copy_sweep(pristine_sweep, tmp_path / "runs")
    run = runs_by_method_seed(root)[("lora", 0)]
    period = run / "periods" / "2-2020"
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            tmp = staging_dir(period)
            shutil.copytree(period, tmp, dirs_exist_ok=True)
            commit_dir(tmp, period)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(15):
            got = report.read_run(run)
            assert got.status in ("complete", "running"), got.reason
    finally:
        stop.set()
        thread.join()


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.chromium
def test_report_html_renders_in_headless_chromium(damaged_sweep: dict, tmp_path: Path) -> None:
    binary = _chromium()
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but no chromium binary (apt-get install chromium)")
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    page = (damaged_sweep["out"] / "report.html").resolve()
    html = page.read_text()
    assert "http://" not in html and "https://" not in html, "the page must not need the network"
    flags = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=False)
    counts = re.search(r'data-images-ok="(\d+)/(\d+)"', dom.stdout)
    assert counts, f"page script did not run: {dom.stderr[-500:]}"
    assert counts.group(1) == counts.group(2) and int(counts.group(2)) >= 6, counts.group(0)
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1400,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.is_file() and shot.stat().st_size > 20_000
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    non_white = float((pixels.min(axis=-1) < 200).mean())
    colourful = float((pixels.max(axis=-1) - pixels.min(axis=-1) > 60).mean())
    assert non_white > 0.05, "the page is (almost) blank"
    assert colourful > 0.01, "no coloured plot pixels in the screenshot"
    keep = os.environ.get("REPORT_SCREENSHOT")
    if keep:  # for looking at it: REPORT_SCREENSHOT=/tmp/report.png pytest -k chromium
        shutil.copy(shot, keep)


def test_config_yaml_is_in_the_html(damaged_sweep: dict) -> None:
    html = (damaged_sweep["out"] / "report.html").read_text()
    cfg = yaml.safe_load((damaged_sweep["runs"][("lora", 0)] / "config.yaml").read_text())
    assert f"synthetic_hidden_size: {cfg['model']['synthetic_hidden_size']}" in html
    assert "sha256 mismatch" in html


def test_bounds_are_labelled_in_tables_and_never_confused_with_methods(tmp_path: Path):
    """joint and per_task say they are bounds in their manifests; the report labels their groups."""
    from tests.test_method_contract import TINY
    from training import cli

    root = tmp_path / "runs"
    assert cli.main([*TINY, "--method", "lora,joint,per_task", "--run-root", str(root)]) == 0
    out = report.build_report(root, tmp_path / "report")
    labels = sorted(g["label"] for g in out["groups"])
    assert labels == ["joint (bound)", "lora", "per_task (bound)"], labels
    assert "joint (bound)" in (tmp_path / "report" / "report.html").read_text()
