"""LwF (training/methods/lwf.py): the KL against a hand computation, the teacher pass against a deep-copied
teacher model, and the teacher snapshot's round trip in the middle of a period."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from data import DataConfig, load_benchmark
from training.batching import collate, tokenize
from training.config import ModelConfig
from training.methods import METHODS, MethodContext
from training.methods.lwf import LwfOptions, distillation_kl
from training.models import build_synthetic


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("temporalwiki", DataConfig(num_facts=8))


def _fresh(bench, on: str = "lora", seed: int = 0, **options):
    model, tok = build_synthetic(ModelConfig(), bench, seed=0)
    ctx = MethodContext(tokenizer=tok, device=torch.device("cpu"), seed=0, lr=1e-3, period_names=bench.period_names)
    method = METHODS["lwf"](replace(LwfOptions(on=on), **options), ctx)
    torch.manual_seed(seed)
    return method.prepare(model), tok, method


def _batch(tok, texts, num_masked=None):
    data = tokenize(tok, texts, 64)
    batch = collate(data.token_ids, tok.pad_token_id, num_masked)
    batch["texts"] = texts
    return batch


def _perturb(model, seed: int, scale: float = 0.05) -> None:
    """Move every trainable tensor (LoRA's B starts at zero: without this the adapter would be a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def _texts(period, n: int = 4):
    return [p.text for p in period.passages[:n]]


def _student(model, batch):
    model.train()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])


def test_kl_equals_a_hand_computation():
    # one sequence of 4 tokens over a vocabulary of 2; labels mask the first token (a prompt) and the
    # last is padding, so exactly position 1 (predicting token 2) is trained.
    student = torch.tensor([[[0.0, 0.0], [1.0, -1.0], [3.0, 0.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[5.0, 0.0], [0.0, 2.0], [0.0, 0.0], [-9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 1, -100]])
    T = 2.0
    # position 1: student softmax([0.5, -0.5]), teacher softmax([0, 1])
    ps = [math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5)), math.exp(-0.5) / (math.exp(0.5) + math.exp(-0.5))]
    pt = [1 / (1 + math.e), math.e / (1 + math.e)]
    expected = sum(t * math.log(t / s) for t, s in zip(pt, ps))
    got = distillation_kl(student, teacher, labels, T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # two trained positions average; a position whose next label is -100 never counts
    labels2 = torch.tensor([[-100, 0, 1, -100]])
    pt0 = [math.exp(2.5) / (math.exp(2.5) + 1), 1 / (math.exp(2.5) + 1)]
    expected0 = sum(t * math.log(t / 0.5) for t in pt0)  # the student is uniform at position 0
    assert distillation_kl(student, teacher, labels2, T).item() == pytest.approx((expected + expected0) / 2, rel=1e-6)
    assert distillation_kl(student, teacher, torch.full_like(labels, -100), T).item() == 0.0


def test_period_one_has_no_teacher(bench):
    model, tok, method = _fresh(bench)
    method.on_period_start(model, bench.periods[0], _texts(bench.periods[0]))
    batch = _batch(tok, _texts(bench.periods[0]))
    assert method.extra_loss(model, batch, _student(model, batch)) is None
    assert method.step_stats() == {"lwf_kl": 0.0}
    assert method.state_dict()["teacher"] is None


@pytest.mark.parametrize("on", ["lora", "full"])
def test_loss_is_exactly_zero_right_after_the_snapshot(bench, on):
    model, tok, method = _fresh(bench, on=on)
    _perturb(model, seed=1)
    period = bench.periods[1]
    method.on_period_start(model, period, _texts(period))
    batch = _batch(tok, _texts(period))
    loss = method.extra_loss(model, batch, _student(model, batch))
    assert loss is not None and loss.item() == 0.0
    assert method.step_stats() == {"lwf_kl": 0.0}


@pytest.mark.parametrize("on", ["lora", "full"])
def test_gradient_equals_a_deep_copied_teacher_and_the_teacher_pass_touches_nothing(bench, on):
    weight, T = 0.7, 3.0
    model, tok, method = _fresh(bench, on=on, weight=weight, temperature=T)
    _perturb(model, seed=1)
    period = bench.periods[1]
    method.on_period_start(model, period, _texts(period))
    teacher = copy.deepcopy(model).eval()  # the reference: a whole second model, as LwF is usually written
    _perturb(model, seed=2)  # the student has moved since the period started
    batch = _batch(tok, _texts(period), num_masked=[2, 0, 3, 1])  # some prompt positions without loss
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    out = _student(model, batch)
    sentinel = {n: torch.full_like(p, 7.0) for n, p in params.items()}
    for n, p in params.items():
        p.grad = sentinel[n].clone()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = method.extra_loss(model, batch, out)
    # the teacher pass changed no parameter, no gradient, and left the model in training mode
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(p.grad, sentinel[n]) for n, p in params.items())
    assert dict(model.named_parameters()).keys() == before.keys()
    assert all(m.training for m in model.modules())
    for p in params.values():
        p.grad = None
    loss.backward()
    got = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = _student(model, batch).logits
    mask = batch["labels"][:, 1:] != -100
    kl = F.kl_div(F.log_softmax(s_logits[:, :-1][mask] / T, -1), F.log_softmax(t_logits[:, :-1][mask] / T, -1),
                  log_target=True, reduction="sum") / mask.sum()
    ref = weight * T * T * kl
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert method.step_stats()["lwf_kl"] == pytest.approx(kl.item(), rel=1e-5)
    assert ref.item() > 1e-4, "the student must differ from the teacher for this test to mean anything"
    ref.backward()
    for n, p in params.items():
        assert torch.allclose(got[n], p.grad, rtol=1e-4, atol=1e-7), n


def _train(model, method, batch, steps: int):
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
    for _ in range(steps):
        out = _student(model, batch)
        loss = out.loss + (method.extra_loss(model, batch, out) or 0)
        loss.backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad()
        method.after_optimizer_step(model)


def test_state_round_trips_in_the_middle_of_a_period(bench, tmp_path):
    model, tok, method = _fresh(bench)
    p1, p2 = bench.periods[0], bench.periods[1]
    method.on_period_start(model, p1, _texts(p1))
    _train(model, method, _batch(tok, _texts(p1)), steps=3)
    method.on_period_start(model, p2, _texts(p2))
    batch = _batch(tok, _texts(p2))
    _train(model, method, batch, steps=2)
    trainable, state = method.trainable_state_dict(model), method.state_dict()
    assert state["teacher"] is not None and state["teacher"].keys() == trainable.keys()

    # a differently initialised model and method, loaded as the trainer resumes a step checkpoint: its own
    # on_period_start snapshots the wrong teacher, and the loaded state must replace it
    other, _, other_method = _fresh(bench, seed=1)
    other_method.on_period_start(other, p2, _texts(p2))
    other_method.load_trainable_state_dict(other, trainable)
    torch.save(state, tmp_path / "method_state.pt")
    other_method.load_state_dict(torch.load(tmp_path / "method_state.pt", weights_only=True))
    a = method.extra_loss(model, batch, _student(model, batch))
    b = other_method.extra_loss(other, batch, _student(other, batch))
    assert a.item() > 0 and torch.equal(a, b)

