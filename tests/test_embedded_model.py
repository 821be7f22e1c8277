"""The embedded SmolLM2-135M-Instruct: GGUF -> cached safetensors, then a few real LoRA steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data import DataConfig, load_benchmark
from training.batching import collate, tokenize
from training.config import ModelConfig
from training.methods import METHODS, MethodContext
from training.models import load_model

pytestmark = pytest.mark.slow


def test_embedded_smollm2_loads_from_its_cache_and_lora_steps_lower_the_loss(tmp_path_factory):
    # The default cache (~/.cache/clkit) is reused across sessions, so the 100 MB conversion runs once
    # per machine; a fresh cache dir here would redo it on every test run.
    cfg = ModelConfig()
    bench = load_benchmark("temporalwiki", DataConfig(num_facts=4))
    loaded = load_model(cfg, "real", bench, seed=0)
    assert loaded.source.startswith("embedded:")
    cache = Path(loaded.source.split(":", 1)[1])
    assert (cache / "model.safetensors").is_file() and (cache / "config.json").is_file()
    model, tok = loaded.model, loaded.tokenizer
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert "quantization_config" not in model.config.to_dict(), "the cached copy is a plain fp32 model"

    ctx = MethodContext(tokenizer=tok, device=torch.device("cpu"), seed=0, lr=1e-3,
                        period_names=bench.period_names)
    method = METHODS["lora"](METHODS["lora"].config_cls(r=8, alpha=16), ctx)
    torch.manual_seed(0)
    model = method.prepare(model)
    texts = [p.text for p in bench.periods[0].passages[:4]]
    batch = collate(tokenize(tok, texts, 64).token_ids, tok.pad_token_id)
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-3)
    losses = []
    for _ in range(4):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0], losses
    adapter = method.trainable_state_dict(model)
    assert adapter and all("lora_" in k for k in adapter)
    assert sum(t.numel() for t in adapter.values()) < 0.05 * sum(p.numel() for p in model.parameters())
