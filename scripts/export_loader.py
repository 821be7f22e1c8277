"""Load a clkit_memory_model export (smf, casm) written by scripts/export.py.

    from scripts.export_loader import load_memory_export
    loaded = load_memory_export("exports/casm-2022")       # verifies manifest.json first
    loaded.model, loaded.tokenizer                          # a transformers model with the memories attached

Why a loader of our own: smf and casm add product-key memories next to the FFN of some decoder layers
(and casm a period router whose choice gates the memory banks), wired in through forward hooks.
transformers has no class for that, and loading only backbone/ would give the base model back with
nothing learnt. So the export keeps backbone/ as a plain model directory that stock
AutoModelForCausalLM loads, and clkit/ holds the period's own trainable.safetensors and method_state.pt.
Loading is exactly what training does to build a period's model: the method's prepare() attaches the
modules to the backbone, then training.restore.load_saved_state fills them; the loaded memory state is
checked against the period's trainable_sha256 recorded in the manifest. The result is a plain
nn.Module whose forward and generate() include the memories (eval_and_metrics.evaluate runs on it).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from artifacts import read_manifest, verify_manifest  # noqa: E402

MEMORY_FORMAT = "clkit_memory_model"  # scripts/export.py MEMORY_MODEL; repeated so this file imports light


@dataclass
class MemoryExport:
    model: nn.Module
    tokenizer: Any
    method: Any  # the training.methods Method whose hooks run inside model's forward; keep it alive
    manifest: dict[str, Any]


def load_memory_export(directory: str | Path, device: str | torch.device = "cpu",
                       verify: bool = True) -> MemoryExport:
    """Rebuild the exported period's model: backbone + the method's modules + the period's state.

    Raises ValueError for a directory that is not a complete clkit_memory_model export (checked
    before anything is loaded), or whose state does not hash to what the period committed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from artifacts import state_sha256
    from training.methods import METHODS, MethodContext
    from training.period_model import load_run_config
    from training.restore import load_saved_state

    directory = Path(directory)
    if verify:
        ok, reason = verify_manifest(directory)
        if not ok:
            raise ValueError(f"{directory} is not a complete export: {reason}")
    manifest = read_manifest(directory) or {}
    if manifest.get("format") != MEMORY_FORMAT:
        raise ValueError(f"{directory} is a {manifest.get('format')!r} export, not {MEMORY_FORMAT}: load it with "
                         "transformers / peft directly (docs/export.md)")
    clkit, backbone = directory / "clkit", directory / "backbone"
    modules = json.loads((clkit / "modules.json").read_text(encoding="utf-8"))
    cfg = load_run_config(clkit)  # the run's config.yaml, copied: method options as training read them
    device = torch.device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone))
    # dtype "auto": the dtype the backbone was saved in, i.e. the one training ran in.
    model = AutoModelForCausalLM.from_pretrained(str(backbone), dtype="auto").to(device)
    ctx = MethodContext(tokenizer=tokenizer, device=device, seed=cfg.seed, lr=cfg.train.lr,
                        period_names=list(modules["period_names"]))
    method = METHODS[modules["method"]](cfg.method.options, ctx)
    model = method.prepare(model).to(device)
    load_saved_state(method, model, clkit)
    expected = (manifest.get("source") or {}).get("trainable_sha256")
    if expected and state_sha256(method.trainable_state_dict(model)) != expected:
        raise ValueError(f"{directory}: the loaded memory state does not hash to the period's trainable_sha256 "
                         f"({modules['method']} builds its modules differently from the code that exported it)")
    model.eval()
    return MemoryExport(model=model, tokenizer=tokenizer, method=method, manifest=manifest)
