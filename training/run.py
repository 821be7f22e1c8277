"""Opening a run directory for training: creating it, locking it, and refusing to resume under a different
config. Its layout (every path in it) is artifacts/rundir.py's RunDir."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from artifacts import (
    RunDir,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    cleanup_stale_tmp,
    commit_dir,
    read_text_inside,
    staging_dir,
)
from artifacts.rundir import CONFIG_FILE
from training.config import REPO_ROOT, ConfigError, RunConfig, configs_differ, drop_runtime_keys
from training.workload import Workload

_PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy", "gguf")


def code_version() -> str:
    try:
        # check=False: outside a git checkout (or without git) the version is "unknown", not an error
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha + ("-dirty" if dirty else "")) if sha else "unknown"


def slurm_info() -> dict[str, str | int | None]:
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    return {"slurm_job_id": job, "restart_count": int(restarts) if restarts and restarts.isdigit() else 0}


def _package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def run_dir_of(cfg: RunConfig) -> Path:
    """<run_root>/<run_id>, checked to be a direct child of the run root.

    run_id is validated as one path component (data/fields.py Name); this is the second line of
    defence, so that no future source of run ids can place a run outside the run root.
    """
    root = Path(cfg.run_root).expanduser()
    run_dir = root / cfg.resolved_run_id()
    if run_dir.resolve().parent != root.resolve():
        raise ConfigError(
            [
                (
                    f"run_id {cfg.resolved_run_id()!r} must name a directory directly under run_root "
                    f"{str(root)!r}, not a path"
                )
            ]
        )
    return run_dir


def open_run(cfg: RunConfig, workload: Workload, extra: dict | None = None) -> tuple[RunDir, RunLock]:
    """Create or reopen the run directory under an exclusive lock.

    Refuses (ConfigError) when the directory holds a run whose resolved config differs, listing the
    differing fields: resuming under another config would silently mix two experiments.
    """
    root = run_dir_of(cfg)
    paths = RunDir(root)
    current = cfg.to_dict()
    current["run_id"] = cfg.resolved_run_id()
    if paths.config.exists():
        saved = yaml.safe_load(read_text_inside(root, CONFIG_FILE)) or {}
        saved_identity = {k: v for k, v in saved.items() if k not in ("run_root",)}
        ours = {k: v for k, v in current.items() if k not in ("run_root",)}
        for tree in (saved_identity, ours):
            drop_runtime_keys(tree)
        diffs = configs_differ(saved_identity, ours)
        if diffs:
            raise ConfigError(
                [
                    (
                        f"run directory {root} holds a run with a different config; differing fields: "
                        f"{', '.join(diffs)}. Use another --run-id or the original config"
                    )
                ]
            )
    lock = RunLock(root)  # creates the directory
    lock.acquire()  # held until the caller's `with lock:` block ends
    cleanup_stale_tmp(root)
    for sub in (paths.periods, paths.checkpoints):
        if sub.is_dir():
            cleanup_stale_tmp(sub)
    paths.repair_log_tail()  # before the first append: a torn tail must stay the last line (read_jsonl)
    if not paths.config.exists():
        atomic_write_text(paths.config, yaml.safe_dump(current, sort_keys=False))
    if not paths.data.is_dir():
        staging = staging_dir(paths.data)
        workload.write_files(staging)
        commit_dir(staging, paths.data)
    meta = {
        "run_id": cfg.resolved_run_id(),
        "config_hash": cfg.config_hash(),
        "code_version": code_version(),
        "data_fingerprint": workload.fingerprint,
        "packages": _package_versions(),
        "python": sys.version.split()[0],
        "host": socket.gethostname(),
        "platform": platform.platform(),
        **slurm_info(),
        **(extra or {}),
    }
    atomic_write_json(paths.run_meta, meta)
    return paths, lock


def human_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"
