"""A committed period's model rebuilt from its run directory, for the jobs that analyse or export it.

    pm = load_period_model(run_dir, "2020")      # or an index: 2; device "auto" keeps the run's own
    pm.model, pm.tokenizer, pm.method            # as training built them, with period 2020's state loaded

The landscape, lm-eval, export and smf-probe jobs all start here: the same construction as training
(training/restore.py), refused unless the period's manifest verifies and the loaded trainable state hashes
to what the manifest recorded, so an analysis never runs on a different model. Errors are one-line
BadInput (exit 2 under scripts/command.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from artifacts import (
    BadInput,
    RunDir,
    UnreadableFileError,
    read_manifest,
    read_regular_text,
    state_sha256,
    verify_manifest,
)
from training.config import ConfigError, RunConfig, build_run_configs
from training.methods import METHODS
from training.methods.base import Method
from training.restore import build_model_and_method, load_saved_state
from training.workload import Workload, read_workload


@dataclass
class PeriodModel:
    cfg: RunConfig
    bench: Workload  # the run's periods (temporal) or tasks (stream), read back from data/
    model: torch.nn.Module
    tokenizer: Any
    method: Method
    device: torch.device
    index: int
    name: str
    directory: Path


def load_run_config(run_dir: Path) -> RunConfig:
    """The run's config as training resolved it; BadInput (one line) for a config.yaml that is not one: a
    FIFO, not UTF-8, not YAML, not a mapping, a section that is not a mapping (`method: lora`)."""
    path = RunDir(run_dir).config
    try:
        tree = yaml.safe_load(read_regular_text(path))
    except FileNotFoundError:
        raise BadInput(f"{run_dir} is not a run directory: it has no config.yaml") from None
    except (UnreadableFileError, yaml.YAMLError) as exc:
        raise BadInput(f"{path}: cannot read it as the run's config ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(tree, dict):
        raise BadInput(f"{path} is not a mapping of config sections (a YAML {type(tree).__name__})")
    bad = [
        key
        for key in ("method", "model", "train", "data", "eval", "checkpoint")
        if key in tree and tree[key] is not None and not isinstance(tree[key], dict)
    ]
    if bad:
        raise BadInput(f"{path}: {', '.join(bad)} must be a mapping (a section), as main.py writes it")
    try:
        return build_run_configs(tree, METHODS)[0]
    except ConfigError as exc:
        raise BadInput([f"{path}: {p}" for p in exc.problems]) from None


def load_period_model(
    run_dir: str | Path, period: str | int, device: str = "auto", check_config_hash: bool = True
) -> PeriodModel:
    """Rebuild model + method exactly as training did (training/cli.py run_one) and load period k's state.

    Refuses a period whose manifest does not verify, and checks that the loaded trainable state
    hashes to the manifest's trainable_sha256, so an analysis never runs on a different model.
    check_config_hash=False skips the check that the period was committed under the run's config hash
    (scripts/smf_probe.py: a run trained before an option was added hashes differently now).
    """
    run = RunDir(run_dir)
    cfg = load_run_config(run.root)
    expected_hash = cfg.config_hash()  # of the run as trained, before the device override below
    if device != "auto":
        cfg.model.device = device  # type: ignore[assignment]
    bench = read_workload(run.data)
    k, name = run.resolve_period(["base"] + bench.period_names, period)
    directory = run.period_dir(k, name)
    ok, reason = verify_manifest(directory)
    if not ok:
        raise BadInput(f"{directory} is not a committed period: {reason}")
    manifest = read_manifest(directory) or {}
    if check_config_hash and manifest.get("config_hash") not in (None, expected_hash):
        raise BadInput(f"{directory} was committed under another config than {run.config}")
    loaded, method, model = build_model_and_method(cfg, bench)
    load_saved_state(method, model, directory)
    expected = manifest.get("trainable_sha256")
    if expected and state_sha256(method.trainable_state_dict(model)) != expected:
        raise BadInput(
            f"{directory}: the rebuilt trainable state does not hash to the manifest's "
            "trainable_sha256 (model construction differs from training)"
        )
    model.eval()
    return PeriodModel(
        cfg=cfg,
        bench=bench,
        model=model,
        tokenizer=loaded.tokenizer,
        method=method,
        device=loaded.device,
        index=k,
        name=name,
        directory=directory,
    )
