"""The contract every registered method passes: a new method gets these tests for free.

prepare keeps the model's outputs; a training step changes only what the method says is trainable;
trainable and method state round-trip exactly; checkpoints exclude the frozen backbone; and a run
stopped mid-period by a signal resumes to the same results as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data import DataConfig, load_benchmark
from tests.conftest import comparable, only_run_dir, read_results, train_records, signal_after_steps
from training import cli
from training.config import ModelConfig
from training.methods import METHODS, MethodContext
from training.models import build_synthetic

TINY = ["--mode", "synthetic", "--set", "data.num_facts=8", "--set", "train.epochs=2",
        "--set", "train.max_batch_size=4", "--set", "train.progress=false"]


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("temporalwiki", DataConfig(num_facts=8))


def _fresh(name: str, bench, seed: int = 0):
    model, tok = build_synthetic(ModelConfig(), bench, seed=0)
    ctx = MethodContext(tokenizer=tok, device=torch.device("cpu"), seed=seed, lr=1e-3,
                        period_names=bench.period_names)
    method = METHODS[name](METHODS[name].config_cls(), ctx)
    torch.manual_seed(seed)
    model = method.prepare(model)
    return model, tok, method


def _batch(tok, texts: list[str]) -> dict:
    from training.batching import collate, tokenize

    data = tokenize(tok, texts, 64)
    batch = collate(data.token_ids, tok.pad_token_id)
    batch["texts"] = texts
    return batch


def _data(tok, texts: list[str]):
    from training.batching import tokenize

    return tokenize(tok, texts, 64)


def _plain(state):
    """A method state as comparable plain values (tensors as lists)."""
    if isinstance(state, dict):
        return {k: _plain(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_plain(v) for v in state]
    if isinstance(state, torch.Tensor):
        return state.tolist()
    return state


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("name", list(METHODS))
def test_prepare_keeps_outputs_and_a_step_trains_only_trainable_state(name, bench):
    base, tok = build_synthetic(ModelConfig(), bench, seed=0)
    period = bench.periods[0]
    texts = [p.text for p in period.passages[:6]]
    batch = _batch(tok, texts)
    before = _logits(base, batch)
    model, tok, method = _fresh(name, bench)
    assert torch.allclose(_logits(model, batch), before, atol=1e-5), "prepare must not change outputs"

    texts = method.on_period_start(model, period, texts)
    groups = method.trainable_parameters(model)
    params = [p for g in groups for p in g["params"]]
    assert params and all(p.requires_grad for p in params)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    state0 = {k: v.clone() for k, v in method.trainable_state_dict(model).items()}
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    loss = out.loss
    extra = method.extra_loss(model, batch, out)
    if extra is not None:
        loss = loss + extra
    assert torch.isfinite(loss)
    loss.backward()
    method.after_backward(model)
    opt.step()
    method.after_optimizer_step(model)
    state1 = method.trainable_state_dict(model)
    assert any(not torch.equal(state0[k], state1[k]) for k in state0), "a step must change the trainable state"
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


def _train_period(model, tok, method, period, steps: int = 2) -> tuple[list[str], dict]:
    texts = method.on_period_start(model, period, [p.text for p in period.passages[:6]])
    batch = _batch(tok, texts[:6])
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
    for _ in range(steps):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        loss = out.loss + (method.extra_loss(model, batch, out) or 0)
        loss.backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad()
        method.after_optimizer_step(model)
    method.on_period_end(model, period, _data(tok, texts))
    return texts, batch


@pytest.mark.parametrize("name", list(METHODS))
def test_state_round_trips_exactly_and_excludes_the_backbone(name, bench):
    """Two periods, so state that grows per period (adapters, Fisher, buffers) is there to round-trip; the
    copy is loaded as the trainer resumes a step checkpoint: data hook first, then the saved state."""
    model, tok, method = _fresh(name, bench)
    _train_period(model, tok, method, bench.periods[0])
    period = bench.periods[1]
    texts, batch = _train_period(model, tok, method, period)
    trainable, own = method.trainable_state_dict(model), method.state_dict()

    other, _, other_method = _fresh(name, bench, seed=1)  # different init: the load must overwrite it
    other_method.on_period_start(other, period, [p.text for p in period.passages[:6]])
    other_method.load_trainable_state_dict(other, trainable)
    other_method.load_state_dict(own)
    assert torch.equal(_logits(other, batch), _logits(model, batch))
    assert all(torch.equal(trainable[k], v) for k, v in other_method.trainable_state_dict(other).items())
    assert _plain(other_method.state_dict()) == _plain(own)

    backbone = sum(p.numel() for n, p in model.named_parameters()
                   if not any(n.endswith(k) or n == k for k in trainable))
    num_trainable = sum(t.numel() for t in trainable.values())
    if name != "full_ft":  # the one method whose trainable state is the whole model by definition
        assert num_trainable < sum(p.numel() for p in model.parameters()), "checkpoint must exclude the backbone"
        assert backbone > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(METHODS))
def test_signal_in_period_three_then_resume_equals_uninterrupted(name, tmp_path: Path, monkeypatch):
    """Stopped one step into period 3, where everything a method carries across periods is live (a
    Fisher and its anchors, a replay buffer, a teacher, an episodic memory, earlier adapters, memory
    banks), the resumed run repeats every logged step and ends with the same results and state."""
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*TINY, "--method", name, "--run-root", str(ref_root)]) == 0
    ref_dir = only_run_dir(ref_root)
    ref_steps = train_records(ref_dir)
    num_before = sum(1 for r in ref_steps if r["period"] < 3)
    assert sum(1 for r in ref_steps if r["period"] == 3) >= 2, "period 3 needs steps on both sides of the stop"

    restore_step = signal_after_steps(monkeypatch, num_before + 1)
    assert cli.main([*TINY, "--method", name, "--run-root", str(root)]) == 75
    run_dir = only_run_dir(root)
    assert (run_dir / "periods" / "2-2020").exists() and not (run_dir / "periods" / "3-2022").exists()
    restore_step()
    assert cli.main([*TINY, "--method", name, "--run-root", str(root)]) == 0
    assert comparable(read_results(run_dir)) == comparable(read_results(ref_dir))
    assert train_records(run_dir) == ref_steps


@pytest.mark.parametrize("name", list(METHODS))
def test_a_method_declares_its_hook_inputs_and_gets_only_those(name):
    """batch["texts"] and batch["micro_seed"] reach extra_loss only for a method that names them in
    batch_inputs (training/methods/base.py HOOK_INPUTS); texts lined up with rows rule out packing."""
    from training.methods.base import HOOK_INPUTS, TEXTS

    method = METHODS[name]
    assert set(method.batch_inputs) <= set(HOOK_INPUTS), method.batch_inputs
    assert not (method.packs and TEXTS in method.batch_inputs), "texts are per row; a packed row holds several"
    given = method.hook_inputs(texts=["a"], micro_seed=7)
    assert set(given) == set(method.batch_inputs) and all(given[k] == {"texts": ["a"], "micro_seed": 7}[k]
                                                          for k in given)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_refusal_follows_from_what_the_method_declares(name):
    """One generic check (training.methods.capability_problems) turns each declared capability into a
    refusal: checkpointing, packing and every strategy the method does not list."""
    from training.methods import capability_problems
    from training.strategies import STRATEGIES

    method = METHODS[name]
    cfg = cli.parse_configs(["--mode", "synthetic", "--method", name])[0]
    assert capability_problems(cfg, "temporal" if "temporal" in method.benchmarks else "stream", "single") == []
    for strategy in STRATEGIES:
        problems = capability_problems(cfg, strategy=strategy)
        assert bool(problems) == (strategy not in method.strategies), (strategy, problems)
    cfg.train.gradient_checkpointing = True
    assert bool(capability_problems(cfg)) == (not method.gradient_checkpointing)
    cfg.train.gradient_checkpointing, cfg.train.pack = False, True
    assert bool(capability_problems(cfg)) == (not method.packs)
