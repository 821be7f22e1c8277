"""Run configuration: nested dataclasses built from YAML, CLI flags and `--set a.b=v` overrides.

Precedence, lowest first: dataclass defaults < configs/<mode>.yaml (or --config) < named CLI flags <
--set overrides. Every problem found while building is collected and reported together in one
ConfigError, each naming the dotted field and what is valid, so a user fixes a config in one go.

Each section's fields carry a one-line comment; `describe()` turns them into --help text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from artifacts.identity import RETIRED_RUNTIME_KEYS, RUNTIME_KEYS, drop_runtime_keys, identity_tree  # noqa: F401 (re-exported)
from data.config import DataConfig
from data.fields import Items, Name, Range, Text, build_dataclass, constraints_of, type_name
from training.optimizer_options import CasmoOptions

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """Bad user input. The message is one line per problem; main.py exits 2 on it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass
class ModelConfig:
    # HF hub id or local directory; "" = the embedded SmolLM2-135M-Instruct (real mode)
    name: Annotated[str, Text()] = ""
    # the frozen weights' dtype (trainable ones are float32 whatever it is); auto: float32 on CPU, bfloat16 on CUDA
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    quantize: Literal["none", "4bit"] = "none"  # 4bit = bitsandbytes NF4, CUDA only
    cache_dir: Annotated[str, Text()] = ""  # where the embedded model is cached as safetensors; "" = ~/.cache/clkit
    # Synthetic mode: a tiny randomly initialised Llama (seeded) with a word-level tokenizer.
    synthetic_hidden_size: Annotated[int, Range(1, 8192)] = 64  # hidden size of the synthetic model
    synthetic_layers: Annotated[int, Range(1, 64)] = 2  # number of transformer layers of the synthetic model
    synthetic_heads: Annotated[int, Range(1, 128)] = 4  # attention heads of the synthetic model

    def validate(self) -> list[str]:
        if self.synthetic_hidden_size % self.synthetic_heads:
            return [
                (
                    "model.synthetic_hidden_size must be divisible by model.synthetic_heads "
                    f"(got {self.synthetic_hidden_size} and {self.synthetic_heads})"
                )
            ]
        return []


@dataclass
class TrainConfig:
    epochs: Annotated[int, Range(1, 1000)] = 3  # passes over each period's training data
    optimizer: Literal["adamw", "casmo"] = "adamw"  # update rule (training/optimizers), for any method
    # peak learning rate of AdamW (a method may override per parameter group)
    lr: Annotated[float, Range(0, 100, lo_open=True)] = 3e-4
    weight_decay: Annotated[float, Range(0, 10)] = 0.0  # AdamW weight decay
    betas: Annotated[list[float], Items(2, 2, Range(0, 1, hi_open=True))] = field(
        default_factory=lambda: [0.9, 0.999]
    )  # AdamW betas
    warmup_steps: Annotated[int, Range(0, 1_000_000)] = 10  # linear warmup steps per period ...
    warmup_max_frac: Annotated[float, Range(0, 1)] = 0.1  # ... capped to this fraction of the period's optimizer steps
    min_lr_ratio: Annotated[float, Range(0, 1)] = 0.1  # cosine decays to lr * min_lr_ratio at the end of each period
    # token budget of a length-bucketed micro-batch (incl. padding)
    max_tokens_per_batch: Annotated[int, Range(1, 1 << 20)] = 512
    max_batch_size: Annotated[int, Range(1, 65536)] = 16  # upper bound on sequences per micro-batch
    grad_accum: Annotated[int, Range(1, 65536)] = 1  # micro-batches per optimizer step
    max_grad_norm: Annotated[float, Range(0, 1e6)] = 1.0  # gradient clipping (0 disables)
    max_seq_len: Annotated[int, Range(1, 131072)] = 128  # passages are truncated to this many tokens
    threads: Annotated[int, Range(0, 4096)] = 0  # torch intra-op threads; 0 = torch's default
    # how one run spreads over the ranks the launcher started (docs/distributed.md); auto = single for one
    # process, ddp for several. Not part of the run's identity: a run may resume on another world size.
    strategy: Literal["auto", "single", "ddp", "fsdp"] = "auto"
    # recompute activations in the backward (less memory, about a third more compute); same numbers
    gradient_checkpointing: bool = False
    # bf16: the training forward runs under torch.autocast in bfloat16; the trainable weights and the
    # optimizer's state stay float32 whatever model.dtype is (frozen weights keep model.dtype). auto = bf16
    # when the model computes in bfloat16 (CUDA by default, or model.dtype bfloat16), else none; the
    # resolved choice is recorded in run.json. bf16 changes the numbers, so it is part of the run's identity
    mixed_precision: Literal["auto", "none", "bf16"] = "auto"
    progress: bool = True  # show progress bars (stderr)
    # CUDA's deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace, cudnn): what
    # bit-for-bit resume and "2 ranks equal 1 process" need on GPUs (docs/distributed.md); slower. Changes
    # nothing on CPU; not part of the run's identity (a run may resume with it switched)
    deterministic: bool = False
    # how long a collective waits for a peer before the rank gives up (one line, exit 75): longer than rank 0
    # needs to write a step checkpoint while the others wait; with several ranks only (docs/distributed.md)
    collective_timeout_s: Annotated[float, Range(10, 7 * 86400)] = 1800.0
    # lay each micro-batch's items end to end in one row, each item attending only to itself (position ids
    # restart per item): the same items, loss and gradients as unpacked up to the order of float sums, and
    # no padding. Only for methods that declare it (Method.packs). Part of the run's identity (float
    # reordering changes the last bits)
    pack: bool = False
    # how long the ranks may take to meet at MASTER_ADDR:MASTER_PORT before each gives up (one line naming
    # host:port, exit 75): a host that does not resolve or answer ends the job instead of a silent retry loop
    rendezvous_timeout_s: Annotated[float, Range(1, 86400)] = 120.0
    casmo: CasmoOptions = field(default_factory=CasmoOptions)  # options of optimizer=casmo (docs/optimizers.md)

    def validate(self) -> list[str]:
        if self.max_tokens_per_batch < self.max_seq_len:
            return [
                (
                    "train.max_tokens_per_batch must be >= train.max_seq_len "
                    f"(got {self.max_tokens_per_batch} < {self.max_seq_len})"
                )
            ]
        return []


@dataclass
class EvalConfig:
    batch_size: Annotated[int, Range(1, 65536)] = 32  # probes per generation batch
    # greedy tokens generated per probe; 0 = longest gold answer + 4
    max_new_tokens: Annotated[int, Range(0, 4096)] = 0
    # longest sequence an eval forward sees (perplexity window, kept end of a long prompt), below the model's
    # own (Llama 3 says 131,072, which does not fit on a GPU beside the model)
    max_length: Annotated[int, Range(2, 1 << 20)] = 4096
    # padded tokens per eval batch (items x the longest), besides batch_size; 0 = batch_size alone
    max_tokens_per_batch: Annotated[int, Range(0, 1 << 30)] = 32768
    # held-out tasks scored at the base row and after every period (a stream file or preset whose eval items
    # only are used): the retention track, docs/metrics.md; "" = none
    retention: Annotated[str, Text()] = ""


# The eval bounds' defaults, left out of the saved config (and the run id) at these values.
EVAL_BOUNDS = {"max_length": EvalConfig.max_length, "max_tokens_per_batch": EvalConfig.max_tokens_per_batch}


@dataclass
class CheckpointConfig:
    every_steps: Annotated[int, Range(0, 10**9)] = 0  # save a step checkpoint every N optimizer steps (0 = off)
    every_seconds: Annotated[float, Range(0, 1e7)] = 300.0  # ... and/or every T seconds of training (0 = off)
    # step checkpoints kept per period (the newest may be in flight, so >= 2)
    keep: Annotated[int, Range(2, 100)] = 2
    # before each period, refuse to start (exit 74) when the disk cannot hold its checkpoints
    check_free_space: bool = True


@dataclass
class TrackConfig:
    """Experiment tracking (docs/tracking.md). How a run is watched, never what it computes: a runtime
    section, outside the run id and the resume check."""

    # trackers to log to, any of tensorboard, mlflow, wandb (each an optional extra); [] = none
    backends: Annotated[list[str], Items(0, 3, Name())] = field(default_factory=list)
    project: Annotated[str, Name()] = "clkit"  # W&B project / MLflow experiment
    group: Annotated[str, Text()] = ""  # W&B group / MLflow tag clkit.group; launch.py sets it per launch
    tags: Annotated[list[str], Items(0, 64, Text(empty_ok=False))] = field(default_factory=list)  # run tags
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # offline: compute nodes rarely reach the net
    # where tracker files go; "" = <run dir>/tracking (a directory shared by a launch's runs also works)
    dir: Annotated[str, Text()] = ""
    # MLflow tracking URI (sqlite:///..., http://...); "" = a file store under the tracking dir
    mlflow_uri: Annotated[str, Text()] = ""

    def validate(self) -> list[str]:
        from training.tracking import BACKENDS, missing_extras

        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            return [f"track.backends: unknown backend {', '.join(map(repr, unknown))}; valid: {', '.join(BACKENDS)}"]
        return missing_extras(self.backends)


@dataclass
class MethodConfig:
    name: str = "lora"  # registered method; main.py also accepts "a,b" or "all" and makes one run each
    options: Any = None  # the chosen method's own config dataclass (YAML: a section named after it)


@dataclass
class RunConfig:
    mode: Literal["real", "synthetic"] = "real"  # real: a pretrained model; synthetic: tiny random model
    # seeds python, numpy and torch; part of the run id (numpy takes seeds below 2**32)
    seed: Annotated[int, Range(0, 2**31 - 1)] = 0
    run_root: Annotated[str, Text(empty_ok=False)] = "runs"  # run directories are created under this
    # a name under run_root, never a path; "" = <benchmark>-<method>-s<seed>-<hash of the resolved config>
    run_id: Annotated[str, Name(empty_ok=True)] = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    # -- derived -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = _to_plain(self)
        options = out["method"].pop("options")
        out["method"] = {"name": self.method.name, self.method.name: options}
        if not self.data.stream:
            # Without a stream these fields mean nothing; leaving them out keeps the saved config and the
            # run id of a temporal run what they were before streams existed, so such runs still resume.
            out["data"].pop("stream")
            out["data"].pop("stream_order")
        if self.train.optimizer == "adamw":
            # the same for the optimizer choice: runs from before it existed used AdamW, and the
            # options of another optimizer mean nothing to it
            out["train"].pop("optimizer")
            out["train"].pop("casmo")
        if self.train.mixed_precision in ("auto", "none"):
            # as above: runs from before the option keep their identity; auto is none wherever such runs
            # ran (a float32 model), and what it resolved to is recorded in run.json
            out["train"].pop("mixed_precision")
        if not self.train.pack:
            out["train"].pop("pack")  # as above: the saved config and run id of an unpacked run stay what they were
        if not self.train.deterministic:
            out["train"].pop("deterministic")  # as above: the saved config of a run stays what it was
        if self.train.collective_timeout_s == TrainConfig.collective_timeout_s:
            out["train"].pop("collective_timeout_s")
        if self.train.rendezvous_timeout_s == TrainConfig.rendezvous_timeout_s:
            out["train"].pop("rendezvous_timeout_s")  # as above
        for key, default in EVAL_BOUNDS.items():
            if out["eval"][key] == default:
                out["eval"].pop(key)  # as above: the bounds came later, at values no earlier test run reached
        if not self.eval.retention:
            out["eval"].pop("retention")  # as above: runs without a retention track keep their run id
        return out

    def identity_dict(self) -> dict:
        """What defines the results: everything but where the run lives and how it is shown."""
        return identity_tree(self.to_dict())  # the rule the report's seed groups follow too

    def config_hash(self) -> str:
        blob = json.dumps(self.identity_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def default_run_id(self) -> str:
        if self.data.stream:
            bench = Path(self.data.stream).stem + (f"-o{self.data.stream_order}" if self.data.stream_order else "")
        else:
            bench = Path(self.data.benchmark).stem if self.data.benchmark != "temporalwiki" else "temporalwiki"
        bench = "".join(c if c.isalnum() or c in "-_" else "_" for c in bench)
        return f"{bench}-{self.method.name}-s{self.seed}-{self.config_hash()[:8]}"

    def resolved_run_id(self) -> str:
        return self.run_id or self.default_run_id()


# ------------------------------------------------------------------------------------------
# Generic dataclass <- dict with type checking that collects problems.


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def describe(cls: type, prefix: str = "") -> list[str]:
    """`section.key  (type, default)` lines for --help, from the dataclass fields."""
    lines = []
    hints = typing.get_type_hints(cls)
    rules = constraints_of(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        dotted = f"{prefix}{f.name}"
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, dotted + "."))
        elif f.name != "options":
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]  # no MISSING: every field has one
            rule = rules[f.name]
            valid = f"{type_name(tp)}, {rule.describe()}" if rule else type_name(tp)
            lines.append(f"  {dotted} = {default!r}  ({valid})")
    return lines


# ------------------------------------------------------------------------------------------
# Assembling a run config from the sources.


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[keys[-1]] = value


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"--config {path}: cannot read ({exc.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise ConfigError([f"--config {path}:{where}: {problem}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"--config {path}: the top level must be a mapping of sections"])
    return data


def parse_set(items: list[str]) -> dict:
    """`--set train.lr=1e-4` -> {"train": {"lr": 0.0001}}; values are parsed as YAML scalars."""
    tree: dict = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"--set {item!r} must look like section.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    if problems:
        raise ConfigError(problems)
    return tree


def expand_methods(spec: str, known: list[str], runnable: list[str] | None = None) -> list[str]:
    """`all` means every method that can run on this benchmark (`runnable`); a named one is kept, and
    refused later with a clear message if it cannot run here."""
    if spec == "all":
        return list(runnable if runnable is not None else known)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(
            [
                (
                    f"method.name {spec!r} is not a registered method; valid: {', '.join(known)} "
                    "(or a comma-separated list, or all)"
                )
            ]
        )
    return names


def build_run_configs(tree: dict, method_registry: dict[str, Any]) -> list[RunConfig]:
    """One RunConfig per requested method; raises ConfigError with every problem found."""
    problems: list[str] = []
    tree = drop_retired_keys(tree, problems)
    method_tree = dict(tree.pop("method", None) or {})
    base = build_dataclass(RunConfig, {k: v for k, v in tree.items()}, "", problems)
    known = list(method_registry)
    kind = "stream" if isinstance(base.data.stream, str) and base.data.stream else "temporal"
    runnable = [n for n, m in method_registry.items() if kind in getattr(m, "benchmarks", (kind,))]
    spec = method_tree.pop("name", "lora")
    try:
        names = expand_methods(str(spec), known, runnable)
    except ConfigError as exc:
        problems.extend(exc.problems)
        names = []
    # Validate every method section present (a shared YAML may configure several methods), so a
    # typo in a section for another method is still caught.
    options: dict[str, Any] = {}
    for key, section in method_tree.items():
        if key not in method_registry:
            problems.append(f"unknown key method.{key}; known keys: name, {', '.join(known)}")
            continue
        options[key] = build_dataclass(method_registry[key].config_cls, section, f"method.{key}", problems)
    for name in names:
        if name not in options:
            options[name] = build_dataclass(method_registry[name].config_cls, {}, f"method.{name}", problems)
    if problems:
        raise ConfigError(problems)
    if base.run_id and len(names) > 1:
        raise ConfigError(
            [
                (
                    f"run_id {base.run_id!r} names one run, but method.name asks for {len(names)} "
                    "methods; drop --run-id or pick one method"
                )
            ]
        )
    return [dataclasses.replace(base, method=MethodConfig(name=n, options=options[n])) for n in names]


def load_tree(config_path: str | None, mode: str | None, flags: dict[str, Any], sets: list[str]) -> dict:
    """Merge the sources into one plain tree (before type checking)."""
    tree: dict = {}
    if config_path:
        tree = read_yaml(Path(config_path))
    else:
        preset = CONFIG_DIR / f"{mode or tree.get('mode') or 'real'}.yaml"
        if preset.exists():
            tree = read_yaml(preset)
    for dotted, value in flags.items():
        if value is not None:
            _set_dotted(tree, dotted, value)
    return _deep_merge(tree, parse_set(sets))


# The seconds slept after each optimizer step, so that a test can signal or kill a run mid-period. A test
# knob, not a setting of the experiment, so it is no config field: tests set it in the environment of the
# process they start (tests/conftest.py slow_steps). Read by the trainer, nowhere else.
STEP_SLEEP_ENV = "CLKIT_STEP_SLEEP"

# Keys that left the config, with the value every config saved before meant by default and what replaced
# them. A saved config.yaml (or a copy of one) holding that value still loads; any other value is refused.
RETIRED_KEYS = {
    ("train", "step_sleep"): (
        0.0,
        (
            f"set the environment variable {STEP_SLEEP_ENV}=<seconds> instead "
            "(a test-only knob, not part of a run's config)"
        ),
    )
}
# the run identity drops the same keys from a config saved before they retired (artifacts/identity.py)
assert set(RETIRED_KEYS) == {(s, k) for s, keys in RETIRED_RUNTIME_KEYS.items() for k in keys}


def step_sleep() -> float:
    """$CLKIT_STEP_SLEEP as seconds (0 when unset); ConfigError for anything but 0..3600."""
    raw = os.environ.get(STEP_SLEEP_ENV, "").strip()
    try:
        seconds = float(raw) if raw else 0.0
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= 3600:
        raise ConfigError([f"{STEP_SLEEP_ENV}={raw!r} must be seconds between 0 and 3600 (or unset)"])
    return seconds


def drop_retired_keys(tree: dict, problems: list[str]) -> dict:
    """`tree` without the retired keys (RETIRED_KEYS); a problem for each one set to another value."""
    tree = dict(tree)
    for (section, key), (old_default, instead) in RETIRED_KEYS.items():
        if isinstance(tree.get(section), dict) and key in tree[section]:
            tree[section] = dict(tree[section])
            value = tree[section].pop(key)
            if value != old_default:
                problems.append(f"{section}.{key} is no longer a config key: {instead}")
    return tree


def configs_differ(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted names of the fields whose values differ between two resolved config trees."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(configs_differ(a, b, dotted + "."))
        elif a != b:
            diffs.append(f"{dotted} ({a!r} -> {b!r})")
    return diffs
