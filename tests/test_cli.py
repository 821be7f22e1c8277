"""The CLI as a user meets it: bad input exits 2 with one line and writes nothing; a run leaves
exactly the documented files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from artifacts import verify_manifest
from tests.conftest import SMALL, only_run_dir, run_main
from training import cli


@pytest.mark.parametrize("args, needle", [
    (["--method", "nope"], "method.name 'nope' is not a registered method; valid: full_ft, lora"),
    (["--set", "train.bogus=1"], "unknown key train.bogus; known keys:"),
    (["--set", "train.lr=fast"], "train.lr must be a number (got 'fast')"),
    (["--mode", "real", "--model", "./no/such/model"], "model.name './no/such/model': no such directory"),
    (["--benchmark", "/no/such/benchmark"], "/no/such/benchmark"),
    (["--quantize", "4bit"], "model.quantize 4bit needs a CUDA GPU"),
    (["--set", "data.change_share=2"], "data.change_share"),
    (["--set", "method.lora.target_modules=[nope_proj]"], "method.lora.target_modules ['nope_proj']"),
    # a method on top of LoRA names its own section, not lora's
    (["--method", "ewc", "--set", "method.ewc.target_modules=[nope_proj]"], "method.ewc.target_modules ['nope_proj']"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, capsys, args, needle):
    # In-process (same code path as the subprocess, minus 8 s of imports per case).
    root = tmp_path / "runs"
    code = cli.main(["--mode", "synthetic", "--set", "train.progress=false", "--run-root", str(root), *args])
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert not root.exists()


def test_malformed_yaml_and_malformed_data_file(tmp_path: Path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train: [unclosed\n")
    proc = run_main("--config", str(bad_yaml), "--run-root", str(tmp_path / "r"))
    assert proc.returncode == 2 and "bad.yaml" in proc.stderr and "line" in proc.stderr
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    (bench_dir / "benchmark.json").write_text("{not json")
    proc = run_main("--mode", "synthetic", "--benchmark", str(bench_dir), "--run-root", str(tmp_path / "r"))
    assert proc.returncode == 2 and "benchmark.json" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_smoke_run_leaves_exactly_the_documented_files(tmp_path: Path):
    root = tmp_path / "runs"
    proc = run_main(*SMALL, "--method", "full_ft", "--run-root", str(root), "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ACC" in proc.stdout and str(root) in proc.stdout
    run = only_run_dir(root)
    assert run.name.startswith("temporalwiki-full_ft-s3-")
    top = sorted(p.name for p in run.iterdir())
    assert top == [".lock", "checkpoints", "config.yaml", "data", "periods", "results.json", "run.json",
                   "tokenizer", "train_log.jsonl"]
    assert list((run / "checkpoints").glob("*/step-*")) == []
    periods = sorted(p.name for p in (run / "periods").iterdir())
    assert periods == ["0-base", "1-2018", "2-2020", "3-2022", "4-2024"]
    for name in periods:
        files = sorted(str(p.relative_to(run / "periods" / name)) for p in (run / "periods" / name).rglob("*")
                       if p.is_file())
        assert files == ["eval/predictions.jsonl", "eval/scores.json", "manifest.json", "method_state.pt",
                         "trainable.safetensors", "trainer_state.pt"]
        ok, reason = verify_manifest(run / "periods" / name)
        assert ok, reason
    manifest = json.loads((run / "periods" / "2-2020" / "manifest.json").read_text())
    for key in ("schema_version", "run_id", "method", "period_index", "period_name", "status", "config_hash",
                "data_fingerprint", "code_version", "files", "metrics", "started_at", "finished_at",
                "slurm_job_id", "restart_count", "trainable_sha256"):
        assert key in manifest, key
    assert manifest["status"] == "complete" and manifest["period_index"] == 2
    results = json.loads((run / "results.json").read_text())
    matrix = results["metrics"]["matrix_storage_em"]
    assert len(matrix) == 5 and all(len(row) == 4 for row in matrix)  # base row + 4 periods, 4 probe sets
    # a rerun of a finished run is a no-op that reports the same numbers
    again = run_main(*SMALL, "--method", "full_ft", "--run-root", str(root), "--seed", "3")
    assert again.returncode == 0
    assert json.loads((run / "results.json").read_text()) == results


def test_second_writer_gets_a_clear_error_naming_the_holder(tmp_path: Path):
    from artifacts import RunLock

    root = tmp_path / "runs"
    proc = run_main(*SMALL, "--method", "lora", "--run-root", str(root), "--run-id", "busy",
                    "--set", "train.epochs=1")
    assert proc.returncode == 0
    # hold the lock from another process (this pytest process), then try to write
    with RunLock(root / "busy"):
        proc = run_main(*SMALL, "--method", "lora", "--run-root", str(root), "--run-id", "busy",
                        "--set", "train.epochs=1")
    assert proc.returncode == 3
    assert "is locked by host=" in proc.stderr and "pid=" in proc.stderr


def test_a_casm_raw_file_with_contradictory_changed_flags_runs_with_a_warning_naming_the_records(
        tmp_path: Path, capsys) -> None:
    # the CASM project's synthetic_facts_raw.json layout, with its flaw: records whose changed flag
    # contradicts their values (there, records 210 and 450); the values decide and the run goes on
    from tests.test_data import CASM_RECORDS, write_raw

    records = json.loads(json.dumps(CASM_RECORDS))
    records[2]["changed"] = False
    records[1]["changed"] = True
    bench_dir = tmp_path / "casm"
    bench_dir.mkdir()
    write_raw(bench_dir, records)
    code = cli.main(["--mode", "synthetic", "--method", "full_ft", "--benchmark", str(bench_dir),
                     "--run-root", str(tmp_path / "runs"), "--set", "train.epochs=1", "--set", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "2 record(s) have a 'changed' flag" in warnings[0], warnings
    assert "record 1 (Thornex Mining Co" in warnings[0] and "; 2 (Brael Municipal District" in warnings[0]


def test_train_threads_hold_for_the_run_only(tmp_path: Path) -> None:
    # the synthetic preset trains on 1 thread; an in-process caller keeps its own count afterwards (the
    # export round-trip test scored with the leaked count and its float sums moved by 1e-6)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli.main([*SMALL, "--method", "lora", "--set", "train.epochs=1", "--set", "train.progress=false",
                         "--set", "train.threads=1", "--run-root", str(tmp_path)]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
