"""Mechanism tests of the per-task bound (training/methods/per_task.py) on a tiny random Llama.

What the method promises: each period trains its own adapter with no other adapter active; a period's
eval items are scored with that period's adapter (exactly the model right after that period), or with
the base model before the period is trained; the eval scope puts the training state back; a fresh model
loads the state of any period, routing included.
"""

from __future__ import annotations

import pytest
import torch

from data.schema import Period
from tests.test_olora import batch, logits, tiny_llama
from training.methods import METHODS, MethodContext, adapters
from training.methods.lora import LoraOptions
from training.methods import per_task as per_task_module
from training.methods.per_task import PerTask
from training import workload
from training.workload import TemporalWorkload

NAMES = ["a", "b", "c"]


def make(seed: int = 0):
    ctx = MethodContext(tokenizer=None, device=torch.device("cpu"), seed=seed, lr=1e-2, period_names=NAMES)
    method = PerTask(LoraOptions(r=4, alpha=8), ctx)
    return method.prepare(tiny_llama()), method


def period(k: int) -> Period:
    return Period(index=k, name=NAMES[k - 1], passages=(), probes=())


def train(model, method, k: int, steps: int = 3) -> None:
    method.on_period_start(model, period(k), [])
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
    for s in range(steps):
        model.train()
        model(**batch(10 * k + s)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    method.on_period_end(model, period(k), None)


def scoped(model, method, stage: str) -> torch.Tensor:
    with method.eval_scope(model, stage):
        return logits(model, batch())


def training_state(model) -> tuple[list[str], set[str]]:
    return list(model.base_model.active_adapters), {n for n, p in model.named_parameters() if p.requires_grad}


def test_registered_and_labelled_a_bound():
    assert METHODS["per_task"] is PerTask
    assert PerTask.is_bound is True
    assert "BOUND" in per_task_module.__doc__


def test_each_period_is_scored_with_its_own_adapter_and_untrained_ones_with_the_base_model():
    base = logits(tiny_llama(), batch())
    model, method = make()
    for stage in NAMES:  # row 0: nothing trained, every stage is the base model
        assert torch.equal(scoped(model, method, stage), base)
    train(model, method, 1)
    after_1 = logits(model, batch())
    assert not torch.allclose(after_1, base)
    train(model, method, 2)
    after_2 = logits(model, batch())
    assert torch.equal(scoped(model, method, "a"), after_1), "period 1's items: exactly the model after period 1"
    assert torch.equal(scoped(model, method, "b"), after_2)
    assert torch.equal(scoped(model, method, "c"), base), "an untrained period: the base model"


def test_training_uses_only_the_current_adapter():
    base = logits(tiny_llama(), batch())
    model, method = make()
    train(model, method, 1)
    method.on_period_start(model, period(2), [])
    # B_2 starts at zero and period 1's adapter is inactive: the new period starts from the base model
    assert torch.equal(logits(model, batch()), base)
    active, trainable = training_state(model)
    assert active == ["period_2"]
    assert trainable and {adapters.param_adapter(n) for n in trainable} == {2}
    old = {n: p.detach().clone() for n, p in model.named_parameters() if adapters.param_adapter(n) == 1}
    train(model, method, 2)
    assert all(torch.equal(p, old[n]) for n, p in model.named_parameters() if n in old)


def test_the_scope_restores_the_training_state_even_on_error():
    model, method = make()
    train(model, method, 1)
    method.on_period_start(model, period(2), [])
    before = training_state(model)
    for stage in NAMES:
        scoped(model, method, stage)
        assert training_state(model) == before
    with pytest.raises(KeyError), method.eval_scope(model, "a"):
        raise KeyError("eval failed")
    assert training_state(model) == before
    assert not model.base_model.model.model.layers[0].self_attn.q_proj.disable_adapters
    with pytest.raises(ValueError, match="not one of the run's periods"):
        method.eval_scope(model, "zzz")


def test_the_workload_scores_each_stage_inside_its_scope(monkeypatch):
    """TemporalWorkload builds every scope first and enters them one by one: each stage's probes must
    see its own adapter even so."""
    model, method = make()
    train(model, method, 1)
    train(model, method, 2)
    expected = {"a": scoped(model, method, "a"), "b": scoped(model, method, "b"), "c": scoped(model, method, "c")}
    seen = {}

    def fake_eval(model_, tokenizer, probes, *args, **kwargs):
        seen[probes[0]] = logits(model_, batch())
        return []

    monkeypatch.setattr(workload, "evaluate_probes", fake_eval)
    work = TemporalWorkload.__new__(TemporalWorkload)
    work.bench = type("B", (), {"periods": [Period(k, n, (), (n,)) for k, n in enumerate(NAMES, start=1)]})()
    work.probes = list(NAMES)
    work.evaluate(model, None, torch.device("cpu"), 4, 4, lambda: False, lambda n: None,
                  scope=lambda stage: method.eval_scope(model, stage))
    assert all(torch.equal(seen[s], expected[s]) for s in NAMES)


def test_a_fresh_model_loads_any_period_with_its_routing():
    model, method = make()
    train(model, method, 1)
    train(model, method, 2)
    expected = {s: scoped(model, method, s) for s in NAMES}
    state, own = method.trainable_state_dict(model), method.state_dict()
    assert own == {"num_trained": 2}
    assert {adapters.param_adapter(n) for n in state} == {1, 2}
    fresh, fresh_method = make(seed=1)  # different adapter inits: the load must overwrite them
    fresh_method.load_trainable_state_dict(fresh, state)
    fresh_method.load_state_dict(own)
    assert all(torch.equal(scoped(fresh, fresh_method, s), expected[s]) for s in NAMES)
    assert fresh.base_model.active_adapters == ["period_2"], "outside a scope: the newest adapter"
    before = fresh_method.trainable_state_dict(fresh)
    fresh_method.on_period_start(fresh, period(2), [])  # idempotent, as after a step resume's load
    assert all(torch.equal(before[k], v) for k, v in fresh_method.trainable_state_dict(fresh).items())
