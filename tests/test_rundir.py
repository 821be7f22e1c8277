"""artifacts/rundir.py: the run directory's paths, the torn-line policy, period listing and resolving, hashing."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from artifacts import BadInput, RunDir, UnknownPeriod, UnreadableFileError, read_jsonl, state_sha256, write_manifest
from scripts.command import BadInput as CommandBadInput

NAMES = ["base", "2018", "2020", "2022"]


def _commit(run: RunDir, k: int, name: str) -> Path:
    directory = run.period_dir(k, name)
    (directory / "eval").mkdir(parents=True)
    (directory / "eval" / "predictions.jsonl").write_text('{"id": "p1"}\n')
    write_manifest(directory, {"kind": "period"})
    return directory


def test_every_path_of_a_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "r")
    assert run == RunDir(str(tmp_path / "r")) and run.root == tmp_path / "r"
    assert run.config == tmp_path / "r" / "config.yaml"
    assert run.run_meta == tmp_path / "r" / "run.json"
    assert run.results == tmp_path / "r" / "results.json"
    assert run.train_log == tmp_path / "r" / "train_log.jsonl"
    assert run.tracking == tmp_path / "r" / "tracking.json"
    assert run.data == tmp_path / "r" / "data"
    assert run.tokenizer == tmp_path / "r" / "tokenizer"
    assert run.period_dir(2, "2020") == tmp_path / "r" / "periods" / "2-2020"
    assert run.checkpoint_root(2, "2020") == tmp_path / "r" / "checkpoints" / "2-2020"
    assert run.predictions(0, "base") == tmp_path / "r" / "periods" / "0-base" / "eval" / "predictions.jsonl"
    assert run.scores(0, "base") == tmp_path / "r" / "periods" / "0-base" / "eval" / "scores.json"
    assert run.landscape_dir(1, "a") == tmp_path / "r" / "periods" / "1-a" / "landscape"
    assert run.lm_eval_dir(1, "a") == tmp_path / "r" / "periods" / "1-a" / "lm_eval"


def test_a_torn_last_line_is_skipped_and_a_torn_line_elsewhere_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n\n{"b": 2}\n{"c": 3')  # killed mid-append
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    path.write_text('{"a": 1}\n{"b": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    path.write_text('{"a": 1}\n{"b": \n{"c": 3}\n')  # not what a kill leaves
    with pytest.raises(UnreadableFileError, match=r"log.jsonl: line 2 is not JSON .* not the last line"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "absent.jsonl")
    os.symlink(tmp_path / "log.jsonl", tmp_path / "link.jsonl")
    with pytest.raises(UnreadableFileError, match="symbolic link"):
        read_jsonl(tmp_path / "link.jsonl")


def test_the_train_log_before_the_first_record_and_its_newest_record(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.log_rows() == [] and run.last_record() is None
    run.train_log.write_text('{"event": "eval", "period": 0}\n{"event": "train", "period": 1, "step": 3}\n{"ev')
    assert run.log_rows() == [{"event": "eval", "period": 0}, {"event": "train", "period": 1, "step": 3}]
    assert run.last_record() == {"event": "train", "period": 1, "step": 3}
    run.train_log.unlink()
    os.mkfifo(run.train_log)  # must not block
    assert run.last_record() is None


@pytest.mark.parametrize("tail, repaired", [
    ('{"ev', '{"a": 1}\n'),  # a torn tail is cut off
    ('{"b": 2}', '{"a": 1}\n{"b": 2}\n'),  # a complete record that only lacks its newline gets it
    ('', '{"a": 1}\n'),  # nothing to repair
])
def test_repair_log_tail_keeps_a_torn_line_the_last(tmp_path: Path, tail: str, repaired: str) -> None:
    run = RunDir(tmp_path)
    run.train_log.write_text('{"a": 1}\n' + tail)
    run.repair_log_tail()
    assert run.train_log.read_text() == repaired
    with open(run.train_log, "a") as fh:  # what the trainer appends next lands on its own line
        fh.write('{"c": 3}\n')
    assert read_jsonl(run.train_log)[-1] == {"c": 3}
    RunDir(tmp_path / "none").repair_log_tail()  # no log yet: nothing to do


def test_committed_periods_listing(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.committed_periods() == [] and run.committed_prefix(NAMES) == []
    for k in (0, 1, 3):
        _commit(run, k, NAMES[k])
    run.period_dir(2, "2020").mkdir()  # begun, never committed
    (run.periods / ".tmp-2-2020-1-abc").mkdir()  # a writer's staging
    (run.periods / "10-late").mkdir()
    write_manifest(run.periods / "10-late", {})
    os.symlink(run.period_dir(1, "2018"), run.periods / "5-link")  # leads out of the run: not its period
    assert [k for k, _ in run.period_entries()] == [0, 1, 2, 3, 10]
    assert run.committed_periods() == ["0-base", "1-2018", "3-2022", "10-late"]  # numeric order, not text
    assert run.verified_periods(NAMES) == [(0, "base"), (1, "2018"), (3, "2022")]
    assert run.committed_prefix(NAMES) == [0, 1]  # 3 is past a gap
    (run.predictions(1, "2018")).write_text("tampered\n")
    assert run.committed_prefix(NAMES) == [0]
    assert run.checkpoint_entries() == []
    run.checkpoint_root(2, "2020").mkdir(parents=True)
    assert run.checkpoint_entries() == [(2, run.checkpoint_root(2, "2020"))]


def test_resolve_period_by_name_or_index_with_one_line_errors() -> None:
    assert RunDir.resolve_period(NAMES, "2020") == (2, "2020")
    assert RunDir.resolve_period(NAMES, "2") == (2, "2020")
    assert RunDir.resolve_period(NAMES, 0) == (0, "base")
    assert RunDir.resolve_period(["base", "3", "1"], "1") == (2, "1")  # a name wins over an index
    with pytest.raises(UnknownPeriod, match=r"^period 9 out of range; valid: 0\.\.3 or base, 2018, 2020, 2022$"):
        RunDir.resolve_period(NAMES, "9")
    with pytest.raises(UnknownPeriod, match=r"^period 'final' unknown; valid: base, 2018, 2020, 2022 or 0\.\.3$"):
        RunDir.resolve_period(NAMES, "final")
    with pytest.raises(UnknownPeriod, match="unknown"):
        RunDir.resolve_period(NAMES, "²")  # isdigit, but no index
    # a refusal is the commands' BadInput: exit 2, one line
    assert issubclass(UnknownPeriod, BadInput) and CommandBadInput is BadInput
    assert BadInput("a\nb").problems == ["a b"]


def _old_state_sha256(state: dict[str, torch.Tensor]) -> str:
    """training/trainer.py's state_sha256 before it moved to artifacts/rundir.py, verbatim."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def test_state_sha256_is_the_old_hash() -> None:
    g = torch.Generator().manual_seed(0)
    state = {"b.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(3, generator=g).bfloat16(),
             "c.t": torch.randn(3, 5, generator=g).t(), "d.empty": torch.zeros(0, 2),
             "e.int": torch.arange(6, dtype=torch.int64).view(2, 3), "f.param": torch.nn.Parameter(torch.ones(2))}
    assert state_sha256(state) == _old_state_sha256(state)
    assert state_sha256({}) == hashlib.sha256().hexdigest()
    changed = dict(state, **{"b.weight": state["b.weight"] + 1e-6})
    assert state_sha256(changed) != state_sha256(state)
    # pinned: the hash every committed manifest records must not drift with the code that computes it
    assert state_sha256({"w": torch.arange(4, dtype=torch.float32)}) == hashlib.sha256(
        b"w|torch.float32|(4,)|" + torch.arange(4, dtype=torch.float32).numpy().tobytes()).hexdigest()


def test_json_records_round_trip_through_read_jsonl(tmp_path: Path) -> None:
    rows = [{"id": "x\u2028y", "text": "a\rb\nc", "n": 1}, {"id": "2"}]  # json.dumps escapes line breaks
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    assert read_jsonl(path) == rows
