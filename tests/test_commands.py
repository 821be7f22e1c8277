"""Every command over run directories under one contract (scripts/command.py, docs/design.md "Exit codes"):
a catalogue of broken run directories and bad arguments, generated and crossed with every command, each
ending in its documented exit code, at most a few lines of stderr, never a traceback or a bug line, and
nothing written where it should not be; a full or read-only --out is 74; and, in the slow layer, signals
at random instants of an export, a rerun that completes byte-identically, and the scripts run as files.

The in-process part calls each command's main(argv) (the function `main.py <command>` dispatches to),
without seconds of imports per case. The run is the session's small lora run (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from artifacts import TMP_PREFIX, read_manifest, write_manifest
from scripts import compare, export, landscape, launch, lm_eval_job, pool_probes, status
from scripts.command import EXIT_BUG
from tests.conftest import REPO, main_cmd

COMMANDS: dict[str, Any] = {"status": status, "export": export, "landscape": landscape, "pool_probes": pool_probes,
                            "compare": compare, "launch": launch, "lm_eval": lm_eval_job}
LAST = "4-2024"  # the reference run's last period (temporalwiki, four periods)
TINY_LANDSCAPE = ["--grid", "3", "--max-examples", "2", "--fisher-examples", "2", "--power-iters", "2"]


def test_every_subcommand_of_main_py_is_a_command_under_the_contract():
    import main

    assert set(main.SUBCOMMANDS) == set(COMMANDS)
    for name, module in COMMANDS.items():
        assert main.SUBCOMMANDS[name] == module.__name__
        assert hasattr(module.main, "body"), f"{name}: main is not wrapped by scripts.command.command"


# ------------------------------------------------------------------------------------------------
# the catalogue of broken run directories: name -> how to break a copy of a finished run


def _config(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "config.yaml").read_text())


def _write_config(run: Path, tree: Any) -> None:
    (run / "config.yaml").write_text(yaml.safe_dump(tree))


def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _loop(path: Path) -> None:
    path.unlink(missing_ok=True)
    twin = path.with_name(path.name + ".twin")
    path.symlink_to(twin.name)
    twin.symlink_to(path.name)


def _huge(path: Path) -> None:
    with open(path, "wb") as fh:  # sparse: costs no disk, but its size is over every read bound
        fh.truncate(5 << 30)


class _Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(run: Path) -> None:
    period = run / "periods" / LAST
    torch.save({"counts": _Evil(run.parent / "pwned")}, period / "method_state.pt")
    manifest = read_manifest(period) or {}
    write_manifest(period, {k: v for k, v in manifest.items() if k not in ("schema_version", "written_at", "files")})


def _tamper(run: Path) -> None:
    path = run / "periods" / LAST / "trainable.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, another sha256
    path.write_bytes(bytes(data))


BROKEN: dict[str, Callable[[Path], None]] = {
    "config_list": lambda run: (run / "config.yaml").write_text("- lora\n- 3\n"),
    "config_method_scalar": lambda run: _write_config(run, {**_config(run), "method": "lora"}),
    "config_not_utf8": lambda run: (run / "config.yaml").write_bytes(b"mode: synthetic\nseed: \xff\xfe\n"),
    "config_fifo": lambda run: _fifo(run / "config.yaml"),
    "config_link_loop": lambda run: _loop(run / "config.yaml"),
    "config_huge": lambda run: _huge(run / "config.yaml"),
    "log_not_objects": lambda run: (run / "train_log.jsonl").write_text('[1, 2]\n3\n"resume"\n["resume"]\nnull\n'),
    "log_fifo": lambda run: _fifo(run / "train_log.jsonl"),
    "results_not_json": lambda run: (run / "results.json").write_text('{"periods": ["2018"'),
    "results_list": lambda run: (run / "results.json").write_text("[1, 2, 3]\n"),
    "results_fifo": lambda run: _fifo(run / "results.json"),
    "results_link_loop": lambda run: _loop(run / "results.json"),
    "results_huge": lambda run: _huge(run / "results.json"),
    "run_json_not_utf8": lambda run: (run / "run.json").write_bytes(b"\xff" * 10),
    "lock_fifo": lambda run: _fifo(run / ".lock"),
    "manifest_fifo": lambda run: _fifo(run / "periods" / LAST / "manifest.json"),
    "planted_pickle": _plant_pickle,
    "uncommitted": lambda run: (run / "periods" / LAST / "manifest.json").unlink(),
    "tampered": _tamper,
}

# Exit code of each command on each broken run (status lists the run and exits 0; None: not run). What
# each command reads decides: export and landscape read config.yaml and the period, pool_probes
# results.json and config.yaml, compare results.json and the predictions, lm_eval (its checks before
# lm-eval's task index) config.yaml.
_CONFIG = {"export": 2, "landscape": 2, "pool_probes": 65, "compare": 0, "lm_eval": 2}
_RESULTS = {"export": 0, "landscape": 0, "pool_probes": 65, "compare": 65, "lm_eval": None}
_PERIOD = {"export": 2, "landscape": 2, "pool_probes": 0, "compare": 0, "lm_eval": None}
_HARMLESS = {"export": 0, "landscape": 0, "pool_probes": 0, "compare": 0, "lm_eval": None}
EXPECTED: dict[str, dict[str, int | None]] = {
    "config_list": _CONFIG, "config_method_scalar": {**_CONFIG, "pool_probes": 0}, "config_not_utf8": _CONFIG,
    "config_fifo": _CONFIG, "config_link_loop": _CONFIG, "config_huge": _CONFIG,
    "log_not_objects": _HARMLESS, "log_fifo": _HARMLESS, "run_json_not_utf8": _HARMLESS, "lock_fifo": _HARMLESS,
    "results_not_json": _RESULTS, "results_list": _RESULTS, "results_fifo": _RESULTS,
    "results_link_loop": _RESULTS, "results_huge": _RESULTS,
    "manifest_fifo": _PERIOD, "uncommitted": _PERIOD, "tampered": _PERIOD,
    "planted_pickle": {"export": 65, "landscape": 65, "pool_probes": 0, "compare": 0, "lm_eval": None},
}
# a broken run that is not finished and consistent must not be listed as complete
NOT_COMPLETE = {"results_not_json", "results_list", "results_fifo", "results_link_loop", "results_huge",
                "manifest_fifo", "uncommitted", "tampered"}


def argv_of(command: str, run: Path, out: Path) -> list[str]:
    return {
        "status": [str(run.parent)],
        "export": [str(run), "--period", "2024", "--out", str(out / "export")],
        "landscape": [str(run), "--period", "2024", *TINY_LANDSCAPE],
        "pool_probes": [str(run), "--out", str(out / "pooled.md")],
        "compare": ["--no-run", "--run-root", str(run.parent), "--methods", "lora", "--seeds", "0",
                    "--out", str(out / "table")],
        "lm_eval": [str(run), "--tasks", "piqa", "--period", "2024", "--no-default-tasks"],
    }[command]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every entry under root (links not followed), files with size and mtime: what 'nothing written' compares."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            # a directory's mtime changes when a staging dir is made and removed in it: not a write
            out[os.path.relpath(p, root)] = (0, 0) if os.path.isdir(p) else (st.st_size, st.st_mtime_ns)
    return out


def call(command: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = COMMANDS[command].main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_contract(code: int, err: str, expected: int, where: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected, f"{where}: exit {code}, expected {expected}\n{err[-3000:]}"
    assert "Traceback" not in err and "bug in clkit" not in err and code != EXIT_BUG, f"{where}\n{err[-3000:]}"
    # progress lines of a job that worked (export: one, landscape: one per period) or one line per problem
    assert len(lines) <= 3, f"{where}: {len(lines)} lines on stderr\n{err}"
    if expected not in (0,):
        assert sum(line.startswith(("error: ", "stopped: ")) for line in lines) >= 1, f"{where}\n{err}"


def _allowed_writes(command: str, case_code: int, run: Path) -> tuple[str, ...]:
    """Paths (relative to the case dir) a command may create or change when it succeeds."""
    if case_code != 0:
        return ()
    return {"export": ("out/export",), "landscape": (f"runs/{run.name}/periods/{LAST}/landscape",),
            "pool_probes": ("out/pooled.md",), "compare": ("out/table",)}.get(command, ())


SWEEP = [(case, command) for case in BROKEN for command in ("status", *_CONFIG)
         if command == "status" or EXPECTED[case][command] is not None]
# exports and landscapes that succeed build the model and write it (seconds each): the slow layer runs them
FAST = [(case, command) for case, command in SWEEP
        if command == "status" or EXPECTED[case][command] != 0 or command in ("pool_probes", "compare")]


@pytest.fixture
def broken_copy(reference_lora: dict, tmp_path: Path) -> Callable[[str], Path]:
    def make(case: str) -> Path:
        root = tmp_path / "runs"
        root.mkdir()
        run = root / Path(reference_lora["run_dir"]).name  # the run id compare looks for
        shutil.copytree(reference_lora["run_dir"], run, ignore=shutil.ignore_patterns("checkpoints"))
        # a good run beside it (status must still show it); the same run under another id
        good = root / "good"
        shutil.copytree(run, good)
        BROKEN[case](run)
        (tmp_path / "out").mkdir()
        return run
    return make


def _sweep_case(case: str, command: str, broken_copy: Callable[[str], Path], tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> None:
    run = broken_copy(case)
    if command in ("compare",):  # compare tabulates one run per method and seed: the bad one alone
        shutil.rmtree(run.parent / "good")
    before = _tree(tmp_path)
    expected = 0 if command == "status" else EXPECTED[case][command]
    code, out, err = call(command, argv_of(command, run, tmp_path / "out"), capsys)
    where = f"{command} on {case}"
    check_contract(code, err, expected, where)
    allowed = _allowed_writes(command, expected, run)
    after = _tree(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not any(k.startswith(a) or a.startswith(k + "/") for a in allowed))
    assert not changed, f"{where}: wrote {changed[:10]}"
    assert not (tmp_path / "runs" / "pwned").exists(), f"{where}: the planted pickle ran"
    assert not [p for p in tmp_path.rglob(f"{TMP_PREFIX}*")], f"{where}: staging left behind"
    if command == "status":
        rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line.strip()}
        assert rows.get("good") == "complete", f"{where}: the good run is hidden or wrong\n{out}"
        assert run.name in rows, f"{where}: the bad run is not listed\n{out}"
        if case in NOT_COMPLETE:
            assert rows[run.name] != "complete", f"{where}: a broken run is listed as complete\n{out}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case, command", FAST, ids=[f"{c}-{m}" for c, m in FAST])
def test_a_broken_run_directory_ends_in_its_exit_code_and_one_line(case: str, command: str, broken_copy, tmp_path,
                                                                   capsys) -> None:
    _sweep_case(case, command, broken_copy, tmp_path, capsys)


SLOW_SWEEP = [x for x in SWEEP if x not in FAST]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case, command", SLOW_SWEEP, ids=[f"{c}-{m}" for c, m in SLOW_SWEEP])
def test_a_harmless_defect_does_not_stop_a_job(case: str, command: str, broken_copy, tmp_path, capsys) -> None:
    _sweep_case(case, command, broken_copy, tmp_path, capsys)


def test_status_json_lists_a_broken_run_beside_the_good_one(broken_copy, capsys) -> None:
    run = broken_copy("config_list")
    BROKEN["results_fifo"](run)
    BROKEN["log_fifo"](run)
    code, out, err = call("status", [str(run.parent), "--json"], capsys)
    check_contract(code, err, 0, "status --json")
    rows = {r["run_id"]: r for r in map(json.loads, out.splitlines())}
    assert rows["good"]["state"] == "complete" and rows[run.name]["state"] != "complete", rows
    problems = " ".join(rows[run.name]["invalid"])
    assert "config.yaml: not a mapping" in problems and "results.json: is a FIFO" in problems, problems


# ------------------------------------------------------------------------------------------------
# bad arguments and bad paths


def _bad_args(run: Path, tmp: Path) -> list[tuple[str, list[str], int]]:
    afile = tmp / "a-file"
    afile.write_text("x")
    loop = tmp / "loop"
    loop.symlink_to(tmp / "loop2")
    (tmp / "loop2").symlink_to(loop)
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    full = tmp / "not-empty"
    full.mkdir()
    (full / "keep").write_text("mine")
    out = str(tmp / "new-out")
    return [
        ("status", [str(tmp / "missing")], 2), ("status", [str(afile)], 2), ("status", [str(fifo)], 2),
        ("status", [str(loop)], 2), ("status", ["--bogus"], 2), ("status", [str(run.parent), "--logs", str(fifo)], 0),
        ("export", [str(run), "--period", "²", "--out", out], 2),
        ("export", [str(run), "--period", "-1", "--out", out], 2),
        ("export", [str(run), "--period", "1e3", "--out", out], 2),
        ("export", [str(run), "--out", str(afile / "out")], 2),
        ("export", [str(run), "--out", str(loop / "out")], 2),
        ("export", [str(run), "--out", str(loop)], 2),
        ("export", [str(run), "--out", str(full)], 2),
        ("export", [str(run), "--out", str(afile)], 2),
        ("export", [str(run), "--out", str(run / "inside")], 2),
        ("export", [str(run)], 2), ("export", [str(afile), "--out", out], 2),
        ("export", [str(fifo), "--out", out], 2), ("export", [str(tmp / "missing"), "--out", out], 2),
        ("export", [str(run.parent), "--out", out], 2),
        ("landscape", [str(run), "--span", "nan"], 2), ("landscape", [str(run), "--span", "inf"], 2),
        ("landscape", [str(run), "--span", "-1"], 2), ("landscape", [str(run), "--grid", "2"], 2),
        ("landscape", [str(run), "--grid", "x"], 2), ("landscape", [str(run), "--period", "²"], 2),
        ("landscape", [str(run), "--period", "99"], 2), ("landscape", [str(run), "--data-period", "1999"], 2),
        ("landscape", [str(tmp / "missing")], 2), ("landscape", [str(afile)], 2), ("landscape", [], 2),
        ("pool_probes", [str(tmp / "missing")], 2), ("pool_probes", [], 2), ("pool_probes", [str(fifo)], 2),
        ("compare", ["--seeds", "a,b", "--run-root", str(run.parent), "--out", out, "--no-run"], 2),
        ("compare", ["--seeds", "1,1", "--run-root", str(run.parent), "--out", out, "--no-run"], 2),
        ("compare", ["--methods", ",", "--run-root", str(run.parent), "--out", out, "--no-run"], 2),
        ("compare", ["--no-run", "--run-root", str(tmp / "mistyped"), "--out", out], 2),
        ("compare", ["--no-run", "--run-root", str(run.parent), "--methods", "smf", "--out", out], 2),
        ("compare", ["--no-run", "--run-root", str(run.parent)], 2),
        ("launch", ["--methods", "lora", "--seeds", "3-1", "--executor", "local"], 2),
        ("launch", ["--methods", "lora", "--seeds", "x"], 2), ("launch", ["--seeds", "0"], 2),
        ("launch", ["--methods", "lora", "--gpus-per-run", "-1"], 2),
        ("launch", ["--methods", "lora", "--mode", "synthetic", "--run-root", str(tmp / "lr"), "--gpus", "0"], 2),
        ("lm_eval", [str(run), "--tasks", ","], 2), ("lm_eval", [str(tmp / "missing"), "--tasks", "piqa"], 2),
        ("lm_eval", [str(run), "--tasks", "piqa", "--period", "²", "--no-default-tasks"], 2),
        ("lm_eval", [str(run), "--tasks", "piqa", "--batch-size", "x"], 2),
    ]


def test_bad_arguments_and_paths_end_in_2_with_one_line_and_write_nothing(reference_lora: dict, tmp_path: Path,
                                                                          capsys, monkeypatch) -> None:
    run = tmp_path / "runs" / "run"
    shutil.copytree(reference_lora["run_dir"], run, ignore=shutil.ignore_patterns("checkpoints"))
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: launch --executor slurm is bad input here
    monkeypatch.chdir(tmp_path)
    cases = _bad_args(run, tmp_path)
    assert len(cases) >= 45
    for command, argv, expected in cases:
        before = _tree(tmp_path)
        code, _, err = call(command, argv, capsys)
        check_contract(code, err, expected, f"{command} {argv}")
        if expected == 2:
            assert len([line for line in err.splitlines() if line.strip()]) == 1, f"{command} {argv}\n{err}"
        assert _tree(tmp_path) == before, f"{command} {argv}: wrote something"


def test_launch_without_slurm_is_bad_input_not_a_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.chdir(tmp_path)
    code, _, err = call("launch", ["--methods", "lora", "--mode", "synthetic", "--run-root", str(tmp_path / "r"),
                                   "--gpus", "0"], capsys)
    check_contract(code, err, 2, "launch without sbatch")
    assert "sbatch is not on PATH" in err and list(tmp_path.iterdir()) == []


def test_an_unexpected_exception_is_one_bug_line_naming_the_traceback_file(tmp_path: Path, capsys,
                                                                           monkeypatch) -> None:
    monkeypatch.setattr(status, "scan", lambda *a, **k: [][1])  # an IndexError: a bug
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    (tmp_path / "runs").mkdir()
    code, _, err = call("status", [str(tmp_path / "runs")], capsys)
    lines = err.strip().splitlines()
    assert code == EXIT_BUG and len(lines) == 1 and "bug in clkit status: IndexError" in lines[0], err
    [saved] = list(tmp_path.glob("clkit-status-*.traceback"))
    assert str(saved) in lines[0] and "Traceback" in saved.read_text() and "Traceback" not in err


# ------------------------------------------------------------------------------------------------
# storage under --out


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but a small tmpfs cannot be mounted (run as root): {exc}", pytrace=False)
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {exc}")


@pytest.mark.parametrize("how", ["full", "read_only"])
def test_a_full_or_read_only_out_exits_74_in_one_line_and_leaves_nothing(reference_lora: dict, tmp_path: Path,
                                                                         capsys, how: str) -> None:
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, "60k")  # the lora adapter alone is larger
    try:
        if how == "read_only":
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, timeout=30)
        code, _, err = call("export", [reference_lora["run_dir"], "--period", "2024", "--out",
                                       str(disk / "exports" / "out")], capsys)
        check_contract(code, err, 74, f"export to a {how} disk")
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: cannot write") and "exit 74" in line, err
        assert list(disk.iterdir()) == [], "the staging and the created parents are removed"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


# ------------------------------------------------------------------------------------------------
# exports: byte-identical, stale staging removed, stops


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_exports_of_a_period_are_byte_identical_and_stale_staging_is_removed(reference_lora: dict,
                                                                                  tmp_path: Path, capsys) -> None:
    run = reference_lora["run_dir"]
    assert call("export", [run, "--period", "2024", "--out", str(tmp_path / "a")], capsys)[0] == 0
    # what a SIGKILLed export leaves: its staging dir (pid of a process that is gone) and a moved-aside old dir
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [tmp_path / f"{TMP_PREFIX}b-{dead.pid}-x1y2z3", tmp_path / f"{TMP_PREFIX}old-b-{dead.pid}-0a1b"]
    for p in stale:
        p.mkdir()
        (p / "half.safetensors").write_bytes(b"\0" * 10)
    live = tmp_path / f"{TMP_PREFIX}b-{os.getppid()}-live01"  # a live process's: left alone
    live.mkdir()
    assert call("export", [run, "--period", "2024", "--out", str(tmp_path / "b")], capsys)[0] == 0
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    # what varies between processes or seconds, and two exports in one process within a second cannot show:
    # peft's sets are written in hash order (random per process) unless sorted; the time of the export
    adapter = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(adapter["target_modules"]) and len(adapter["target_modules"]) > 1
    period = read_manifest(Path(run) / "periods" / LAST) or {}
    assert (read_manifest(tmp_path / "a") or {})["written_at"] == period["written_at"]
    assert not any(p.exists() for p in stale) and live.exists()


def _run_together(cmds: list[list[str]], stops: list[tuple[float, list[int]]]) -> list[tuple[int, str]]:
    """Start every command at once (the imports of one overlap the work of another: half the wall time on two
    cores), send each its signals at its instant, and return (exit code, stderr) of each."""
    procs = [subprocess.Popen(cmd, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for cmd in cmds]
    start = time.time()
    for (instant, sigs), proc in sorted(zip(stops, procs), key=lambda x: x[0][0]):
        time.sleep(max(0.0, start + instant - time.time()))
        for sig in sigs:
            proc.send_signal(sig)
            time.sleep(0.05)
    return [(proc.communicate(timeout=300)[1], proc.returncode)[::-1] for proc in procs]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_an_export_stopped_at_a_random_instant_exits_cleanly_and_the_rerun_is_byte_identical(
        reference_lora: dict, tmp_path: Path, capsys) -> None:
    # A SIGKILLed export's staging is removed by the next one: tested in-process above (what it leaves is known).
    run = reference_lora["run_dir"]
    assert call("export", [run, "--period", "2024", "--out", str(tmp_path / "reference")], capsys)[0] == 0
    want = _files(tmp_path / "reference")
    seed = int(os.environ.get("CLKIT_SIGNAL_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    first = rng.choice([signal.SIGTERM, signal.SIGINT])  # one handler for both
    labels, sigs = [first.name, "SIGINT twice"], [[first], [signal.SIGINT] * 2]
    # the export takes ~5-20 s on 2 busy cores, imports included (about half of it)
    stops = [(rng.uniform(0.6, 12.0), s) for s in sigs]  # before 0.6 s the interpreter is still starting
    outs = [tmp_path / f"out{i}" for i in range(len(stops))]
    cmds = [main_cmd("export", run, "--period", "2024", "--out", str(out)) for out in outs]
    results = _run_together(cmds, stops)
    reruns = []
    for label, (instant, _), out, cmd, (code, err) in zip(labels, stops, outs, cmds, results):
        where = f"seed={seed} {label} at {instant:.2f}s"
        allowed = (0, 75, 130) if label == "SIGINT twice" else (0, 75)
        assert code in allowed, f"{where}: exit {code}\n{err[-3000:]}"
        assert "Traceback" not in err and "bug in clkit" not in err, f"{where}\n{err[-3000:]}"
        assert "pip install kernels" not in err and "Warning" not in err, f"{where}: library noise\n{err}"
        if code != 0:
            assert "stopped: " in err or "aborted" in err, f"{where}\n{err}"
            assert not out.exists(), f"{where}: --out was written"
            reruns.append(cmd)
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*")), f"seed={seed}: staging left behind"
    for code, err in _run_together(reruns, [(0.0, [])] * len(reruns)):
        assert code == 0, f"seed={seed}: rerun\n{err[-3000:]}"
    for label, out in zip(labels, outs):
        assert _files(out) == want, f"seed={seed} {label}: not byte-identical to the reference export"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_read_only_commands_stop_promptly_and_scripts_run_as_files(reference_lora: dict, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(Path(reference_lora["run_dir"]), root / "run", ignore=shutil.ignore_patterns("checkpoints"))
    _fifo(root / "run" / "results.json")  # it hung status before
    # every script runs as a file, with the project importable, under the same contract (all at once)
    scripts = ("status", "export", "landscape", "pool_probes", "compare", "lm_eval_job", "launch")
    procs = [subprocess.Popen([sys.executable, str(REPO / "scripts" / f"{script}.py"), "--no-such-flag"],
                              cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for script in scripts]
    for script, proc in zip(scripts, procs):
        _, err = proc.communicate(timeout=240)
        lines = err.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (script, err)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "status.py"), str(root)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "run " in proc.stdout and "FIFO" in proc.stdout, proc.stdout + proc.stderr
    # a stop at any instant of `main.py status` (imports included) ends it promptly in 75, or it had finished
    cmds = [main_cmd("status", str(root))] * 3
    started = time.time()
    # (from 0.6 s: before that the interpreter itself is starting, and no Python handler can exist yet)
    for code, err in _run_together(cmds, [(0.6, [signal.SIGTERM]), (1.0, [signal.SIGINT]),
                                          (1.5, [signal.SIGINT, signal.SIGINT])]):
        assert code in (0, 75, 130) and "Traceback" not in err, (code, err)
    assert time.time() - started < 30
