"""The report's rendered summary.md against a golden file, over hand-built run directories (no training).

The runs are written here from a fixed recipe: a tiny generated benchmark (4 facts, 3 periods) and, per
row, predictions whose EM follows a hash of (seed, row, probe), so every number in the summary is fixed.
Between them they cover what the summary shows: seed groups with intervals, a config variant, a partial,
a corrupted and an unreadable run, and a results.json that disagrees with its predictions (a warning).

When a change to the report's rendering is intended, regenerate the golden file and review its diff:

    REPORT_GOLDEN_UPDATE=1 .venv/bin/python -m pytest tests/test_report_golden.py -q

The run root and the generation time are replaced by placeholders before comparing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from artifacts import write_manifest
from data.config import DataConfig
from data.io import write_benchmark
from data.schema import Benchmark
from data.temporalwiki import generate
from eval_and_metrics import report
from eval_and_metrics.metrics import derive_metrics

GOLDEN = Path(__file__).parent / "fixtures" / "report_golden" / "summary.md"
UPDATE_ENV = "REPORT_GOLDEN_UPDATE"
PERIODS = ["2018", "2020", "2022"]


def _bench() -> Benchmark:
    return generate(DataConfig(num_facts=4, periods=list(PERIODS)))


def _config(method: str, seed: int, **train: object) -> dict:
    """A config.yaml as a run writes it (trimmed to what the report reads)."""
    return {"mode": "synthetic", "seed": seed, "run_root": "/somewhere", "run_id": f"{method}-s{seed}",
            "method": {"name": method, "options": {}},
            "model": {"synthetic_hidden_size": 32, "synthetic_layers": 1, "quantize": "none"},
            "data": {"benchmark": "temporalwiki", "num_facts": 4},
            "train": {"lr": 0.01, "epochs": 3, "strategy": "single", "progress": False, **train},
            "checkpoint": {"every_seconds": 0}}


def _em(seed: int, k: int, probe_id: str, skill: int) -> float:
    """1.0 for about skill/8 of the probes, more often for probes of periods already trained (k)."""
    h = int(hashlib.sha256(f"{seed}/{k}/{probe_id}".encode()).hexdigest()[:8], 16) % 8
    return 1.0 if h < skill else 0.0


def write_run(root: Path, name: str, bench: Benchmark, config: dict, rows: int | None = None,
              skill: int = 4, results: bool = True, tamper_results: bool = False) -> Path:
    """One run directory: config.yaml, run.json, data/, periods/<k>-<name>/ (rows of them; all by default)
    each with eval/predictions.jsonl, eval/scores.json and a manifest, and results.json."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    (run / "run.json").write_text(json.dumps({"run_id": name, "config_hash": config_hash}))
    write_benchmark(bench, run / "data")
    names = ["base"] + bench.period_names
    probes = bench.all_probes()
    seed = int(config["seed"])
    ems, f1s, preds = [], [], []
    for k, period in enumerate(names[: len(names) if rows is None else rows]):
        em = {p.id: _em(seed, k, p.id, skill + (2 if bench.period_index(p.period) <= k else 0)) for p in probes}
        f1 = {pid: 1.0 if v else 0.25 for pid, v in em.items()}
        pred = {p.id: p.value if em[p.id] else (p.previous_value or "nothing") for p in probes}
        ems.append(em)
        f1s.append(f1)
        preds.append(pred)
        directory = run / "periods" / f"{k}-{period}"
        (directory / "eval").mkdir(parents=True)
        lines = [{"id": p.id, "em": em[p.id], "f1": f1[p.id], "logprob": -1.0 - (len(p.id) % 5) / 4,
                  "prediction": pred[p.id]} for p in probes]
        (directory / "eval" / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        by_period: dict[str, dict[str, float]] = {}
        for p in probes:
            cell = by_period.setdefault(f"{p.period}/{p.family}", {"em": 0.0, "f1": 0.0, "n": 0})
            cell["em"] += em[p.id]
            cell["f1"] += f1[p.id]
            cell["n"] += 1
        for cell in by_period.values():
            cell["em"] /= cell["n"]
            cell["f1"] /= cell["n"]
        (directory / "eval" / "scores.json").write_text(json.dumps({"by_period": by_period,
                                                                    "extras": {"replay_items": 10 * k}}))
        write_manifest(directory, {"kind": "period", "config_hash": config_hash,
                                   "data_fingerprint": bench.fingerprint, "trainable_sha256": f"{seed}-{k}",
                                   "train": {"total_steps": 5 * k, "tokens": 100 * k}})
    if results and len(ems) == len(names):
        metrics = derive_metrics(ems, f1s, probes, bench.period_names, preds)
        if tamper_results:
            metrics["acc_storage"] = 0.999
        (run / "results.json").write_text(json.dumps({"metrics": metrics, "final_state_sha256":
                                                      f"{seed}-{len(names) - 1}"}))
    return run


def build_runs(root: Path) -> Path:
    bench = _bench()
    for seed, skill in ((0, 4), (1, 5), (2, 3)):
        # seed 1 ran under another strategy: the run identity ignores that, so it is one more seed of lora
        write_run(root, f"lora-s{seed}", bench, _config("lora", seed, strategy="ddp" if seed == 1 else "single"),
                  skill=skill)
    for seed, skill in ((0, 2), (1, 3)):
        write_run(root, f"full_ft-s{seed}", bench, _config("full_ft", seed), skill=skill,
                  tamper_results=seed == 1)
    write_run(root, "full_ft-lr-s0", bench, _config("full_ft", 0, lr=0.05), skill=6)  # a config variant
    write_run(root, "ewc-s0", bench, _config("ewc", 0), rows=3)  # killed in its last period
    corrupted = write_run(root, "ewc-s1", bench, _config("ewc", 1))
    target = corrupted / "periods" / "2-2020" / "eval" / "predictions.jsonl"
    data = bytearray(target.read_bytes())
    data[10] ^= 0x01  # one flipped bit, same size: only the checksum can tell
    target.write_bytes(bytes(data))
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text("mode: synthetic\nmethod: [unclosed\n")
    return root


def _normalised_summary(out: Path, root: Path, result: dict) -> str:
    text = (out / "summary.md").read_text()
    return text.replace(str(root), "<RUN_ROOT>").replace(result["generated_at"], "<GENERATED>")


def test_summary_matches_the_golden_file(tmp_path: Path) -> None:
    root = build_runs(tmp_path / "runs")
    out = tmp_path / "report"
    result = report.build_report(root, out, jobs=1)
    assert result["counts"] == {"complete": 6, "running": 0, "partial": 1, "corrupted": 1, "failed": 1}
    got = _normalised_summary(out, root, result)
    if os.environ.get(UPDATE_ENV):
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(got)
        pytest.skip(f"{GOLDEN} rewritten ({UPDATE_ENV} set): review its diff")
    assert GOLDEN.is_file(), f"no golden file: run with {UPDATE_ENV}=1 once"
    assert got == GOLDEN.read_text(), (f"summary.md differs from {GOLDEN}; if the change is intended, "
                                       f"rerun with {UPDATE_ENV}=1 and review the diff")


def test_runs_differing_only_in_strategy_are_one_variant(tmp_path: Path) -> None:
    """train.strategy is a runtime key of the run identity (artifacts/identity.py), so runs that differ only in
    it (and the seed) are seeds of one setup: one group, one variant, the plain method label."""
    bench = _bench()
    runs = [report.read_run(write_run(tmp_path, f"lora-s{seed}", bench, _config("lora", seed, strategy=strategy)))
            for seed, strategy in ((0, "single"), (1, "ddp"), (2, "fsdp"))]
    assert [r.status for r in runs] == ["complete"] * 3
    assert len({r.variant for r in runs}) == 1
    groups = report.build_groups(runs)
    assert [(g.label, g.n) for g in groups] == [("lora", 3)]


def test_every_runtime_key_is_outside_the_variant() -> None:
    """The variant rule is the run identity's own key list, every key of it, plus the seed."""
    from artifacts.identity import PLACE_KEYS, RUNTIME_KEYS

    base = _config("lora", 0)
    for section, keys in RUNTIME_KEYS.items():
        for key in keys:
            changed = json.loads(json.dumps(base))
            changed[section][key] = "something else"
            assert report.variant_of(changed) == report.variant_of(base), f"{section}.{key}"
    for key in (*PLACE_KEYS, "seed", "checkpoint", "track"):
        assert report.variant_of({**base, key: "elsewhere"}) == report.variant_of(base), key
    assert report.variant_of({**base, "train": {**base["train"], "lr": 0.5}}) != report.variant_of(base)
