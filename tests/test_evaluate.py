"""Batched evaluation must score exactly what one-probe-at-a-time evaluation scores."""

from __future__ import annotations

import torch

from data import DataConfig, load_benchmark
from eval_and_metrics import evaluate as ev
from training.config import ModelConfig
from training.models import build_synthetic


def _setup():
    bench = load_benchmark("temporalwiki", DataConfig(num_facts=8))
    model, tok = build_synthetic(ModelConfig(), bench, seed=0)
    model.eval()
    return bench.all_probes()[:24], model, tok


def test_batched_left_padded_gold_logprob_equals_unbatched_full_logits():
    probes, model, tok = _setup()
    prompts = [ev._encode(tok, p.prompt) for p in probes]
    golds = [ev._encode(tok, " " + p.value) for p in probes]
    assert len({len(p) for p in prompts}) > 1, "the batch must actually need padding"
    fast = ev._gold_logprobs(model, prompts, golds, tok.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        for got, p, g in zip(fast, prompts, golds):
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + g])).logits[0, :-1], -1)
            want = logp[torch.arange(len(p) - 1, len(p) + len(g) - 1), torch.tensor(g)].mean().item()
            assert abs(got - want) < 1e-4


def test_batched_generation_equals_per_probe_generation():
    probes, model, tok = _setup()
    batched = ev.evaluate_probes(model, tok, probes, torch.device("cpu"), batch_size=16)
    single = ev.evaluate_probes(model, tok, probes, torch.device("cpu"), batch_size=1)
    assert [r.prediction for r in batched] == [r.prediction for r in single]
    assert [r.id for r in batched] == [p.id for p in probes]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(batched, single))
