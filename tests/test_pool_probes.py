"""scripts/pool_probes.py: Wilson intervals against published values, pooling by probe counts."""

from __future__ import annotations

import json

import yaml

from scripts.pool_probes import counts_of, main, table, wilson


def test_wilson_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, Table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775
    low, high = wilson(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    assert wilson(0, 10)[0] == 0.0 and round(wilson(0, 10)[1], 4) == 0.2775
    assert round(wilson(10, 10)[1], 12) == 1.0 and round(wilson(10, 10)[0], 4) == 0.7225
    assert wilson(0, 0) == (0.0, 1.0)


def _run(root, name, method, data_seed, **pooled):
    d = root / name
    d.mkdir()
    metrics = {}
    for metric, (rate, n) in pooled.items():
        metrics[f"{metric}_pooled"], metrics[f"{metric}_n"] = rate, n
    (d / "results.json").write_text(json.dumps({"method": method, "seed": 0, "metrics": metrics}))
    (d / "config.yaml").write_text(yaml.safe_dump({"data": {"seed": data_seed}}))
    return d


def test_runs_of_a_method_pool_their_probe_counts(tmp_path):
    a = _run(tmp_path, "a", "casm", 0, plasticity_storage=(40 / 42, 42))
    b = _run(tmp_path, "b", "casm", 1, plasticity_storage=(38 / 42, 42))
    c = _run(tmp_path, "c", "lora", 0, plasticity_storage=(1.0, 42))
    assert counts_of(json.loads((a / "results.json").read_text())["metrics"], "plasticity_storage") == (40, 42)
    text = table([a, b, c])
    low, high = wilson(78, 84)
    assert f"| casm | {78 / 84:.3f} [{low:.3f}, {high:.3f}] n=84 |" in text
    assert "| casm, data seed 1, seed 0 |" in text
    assert "| lora | 1.000 [" in text and "n=42" in text
    assert text.count("—") >= 5  # the metrics the fake runs lack are marked, not zero


def test_a_directory_without_results_is_one_line_and_exit_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: run_dirs:")


def test_out_writes_the_printed_table(tmp_path, capsys):
    run = _run(tmp_path, "r", "smf", 0, stability_storage=(0.5, 24))
    out = tmp_path / "t" / "pool.md"
    assert main([str(run), "--out", str(out)]) == 0
    assert out.read_text() == capsys.readouterr().out
