"""EWC: the penalty, its gradient and the empirical Fisher against hand computations on tiny models, the
online decay, and the state round trip (training/methods/ewc.py)."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from data.schema import Period
from training.batching import PeriodData
from training.methods.base import MethodContext
from training.methods.ewc import EWC, EWCOptions, empirical_fisher, ewc_penalty, fisher_sample

VOCAB = 7


class TinyLM(nn.Module):
    """An HF-shaped causal LM stand-in: embedding -> dropout -> linear head, loss = mean NLL of the
    shifted labels. The dropout makes a Fisher computed in train mode differ from the hand value."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 3)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(3, VOCAB)

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.head(self.drop(self.emb(input_ids)))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def _period(k: int) -> Period:
    return Period(index=k, name=str(2016 + 2 * k), passages=(), probes=())


def _method(**options) -> EWC:
    ctx = MethodContext(tokenizer=SimpleNamespace(pad_token_id=0), device=torch.device("cpu"), seed=0, lr=1e-3,
                        period_names=["2018", "2020", "2022"])
    return EWC(EWCOptions(**options), ctx)


DATA = PeriodData(texts=["a", "b", "c"], token_ids=[[1, 2, 3, 4], [5, 6, 2], [3, 3, 1, 6, 2]], num_masked=[0, 1, 2])


def hand_fisher(model: TinyLM, data: PeriodData, indices: list[int]) -> dict[str, torch.Tensor]:
    """Mean over items of the squared gradient of each item's own mean NLL, from the formula: token j
    (j >= 1 and j >= num_masked) is predicted from position j - 1, dropout off."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in indices:
        ids = torch.tensor(data.token_ids[i])
        logp = torch.log_softmax(model.head(model.emb(ids)), dim=-1)
        targets = [j for j in range(1, len(ids)) if j >= data.num_masked[i]]
        nll = -torch.stack([logp[j - 1, ids[j]] for j in targets]).mean()
        grads = torch.autograd.grad(nll, list(params.values()))
        for n, g in zip(params, grads):
            total[n] += g ** 2
    return {n: t / len(indices) for n, t in total.items()}


def test_penalty_and_its_gradient_equal_the_formula():
    theta = {"a": torch.tensor([1.0, 2.0, -1.0], requires_grad=True), "b": torch.tensor([[0.5]], requires_grad=True)}
    fishers = [{"a": torch.tensor([0.1, 0.2, 0.3]), "b": torch.tensor([[2.0]])},
               {"a": torch.tensor([1.0, 0.0, 0.5]), "b": torch.tensor([[0.25]])}]
    anchors = [{"a": torch.tensor([0.0, 2.0, 1.0]), "b": torch.tensor([[0.0]])},
               {"a": torch.tensor([1.0, 1.0, 0.0]), "b": torch.tensor([[1.5]])}]
    lam = 3.0
    penalty = ewc_penalty(theta, fishers, anchors, lam)
    # pair 1: 0.1*1 + 0.2*0 + 0.3*4 + 2*0.25 = 1.8;  pair 2: 1*0 + 0*1 + 0.5*1 + 0.25*1 = 0.75
    assert penalty.item() == pytest.approx(lam / 2 * (1.8 + 0.75))
    penalty.backward()
    # d/dtheta = lam * sum_t F_t (theta - theta*_t)
    assert torch.allclose(theta["a"].grad, lam * torch.tensor([0.1 * 1 + 1 * 0, 0.2 * 0 + 0, 0.3 * -2 + 0.5 * -1]))
    assert torch.allclose(theta["b"].grad, lam * torch.tensor([[2.0 * 0.5 + 0.25 * -1.0]]))


def test_fisher_is_the_mean_of_squared_per_item_gradients_and_leaves_grads_and_modes_alone():
    model = TinyLM()
    model.train()
    model.drop.eval()  # a submodule in another mode than its parent must get its own mode back
    sentinel = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = sentinel[n].clone()
    fisher, used = empirical_fisher(model, DATA, [0, 1, 2], pad_id=0, device=torch.device("cpu"))
    assert used == 3
    expected = hand_fisher(model, DATA, [0, 1, 2])
    for n in expected:
        assert torch.allclose(fisher[n], expected[n], atol=1e-7, rtol=1e-5), n
    assert model.training and model.head.training and not model.drop.training
    assert all(torch.equal(p.grad, sentinel[n]) for n, p in model.named_parameters())


def test_period_end_samples_items_deterministically_and_anchors_the_parameters():
    model = TinyLM()
    method = _method(fisher_samples=2)
    indices = fisher_sample(3, 2, 0, _period(1))
    assert len(indices) == 2 and indices == fisher_sample(3, 2, 0, _period(1))
    assert fisher_sample(3, 5, 0, _period(1)) == [0, 1, 2]  # all when there are fewer
    method.on_period_end(model, _period(1), DATA)
    expected = hand_fisher(model, DATA, indices)
    assert all(torch.allclose(method.fishers[0][n], expected[n], atol=1e-7, rtol=1e-5) for n in expected)
    assert all(torch.equal(method.anchors[0][n], p) for n, p in model.named_parameters())
    assert method.fisher_info[0]["items"] == 2


def test_penalty_is_zero_at_the_anchor_and_grows_with_one_pair_per_period():
    model = TinyLM()
    method = _method(lam=10.0)
    assert method.extra_loss(model, {}, None) is None and method.step_stats() == {"ewc_penalty": 0.0}
    method.on_period_end(model, _period(1), DATA)
    penalty = method.extra_loss(model, {}, None)
    penalty.backward()
    assert penalty.item() == 0.0 and method.step_stats() == {"ewc_penalty": 0.0}
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())
    f1, a1 = method.fishers[0], method.anchors[0]
    with torch.no_grad():
        model.head.weight.add_(0.5)
    method.on_period_end(model, _period(2), DATA)
    assert len(method.fishers) == 2 and method.periods == [["2018"], ["2020"]]
    params = dict(model.named_parameters())
    # pair 2 is at its anchor, so only pair 1 counts
    expected = 0.5 * 10.0 * sum(float((f1[n] * (params[n].detach() - a1[n]) ** 2).sum()) for n in f1)
    assert method.extra_loss(model, {}, None).item() == pytest.approx(expected, rel=1e-6)
    assert method.step_stats()["ewc_penalty"] == pytest.approx(expected, rel=1e-6)


def test_online_mode_keeps_one_decayed_running_fisher_and_the_latest_anchor():
    model = TinyLM()
    method = _method(online=True, gamma=0.5)
    method.on_period_end(model, _period(1), DATA)
    f1 = {n: t.clone() for n, t in method.fishers[0].items()}
    with torch.no_grad():
        model.head.weight.mul_(1.5)
    method.on_period_end(model, _period(2), DATA)
    f2 = hand_fisher(model, DATA, [0, 1, 2])
    assert len(method.fishers) == len(method.anchors) == 1 and method.periods == [["2018", "2020"]]
    for n in f2:
        assert torch.allclose(method.fishers[0][n], 0.5 * f1[n] + f2[n], atol=1e-7, rtol=1e-5)
    assert all(torch.equal(method.anchors[0][n], p) for n, p in model.named_parameters())


def test_state_round_trips_through_a_weights_only_file():
    model = TinyLM()
    method = _method(lam=2.0)
    method.on_period_end(model, _period(1), DATA)
    with torch.no_grad():
        model.emb.weight.add_(0.1)
    method.on_period_end(model, _period(2), DATA)
    with torch.no_grad():
        model.head.bias.sub_(0.3)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    other = _method(lam=2.0)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.extra_loss(model, {}, None).item() == method.extra_loss(model, {}, None).item() > 0
    a, b = method.state_dict(), other.state_dict()
    assert a["periods"] == b["periods"] and a["fisher_info"] == b["fisher_info"]
    for key in ("fishers", "anchors"):
        assert all(torch.equal(x[n], y[n]) for x, y in zip(a[key], b[key]) for n in x)


class _OnDevice(torch.Tensor):
    """Tensors on an accelerator: what an op on them makes stays there (the largest is recorded);
    `.cpu()` is the way off."""

    largest = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return out.as_subclass(torch.Tensor)
        if isinstance(out, cls):
            cls.largest = max(cls.largest, out.numel())
        return out


def test_fisher_statistics_make_no_flat_copy_on_the_device():
    """Issue 25: the period-end statistics concatenated the whole Fisher on the GPU (4 bytes a trainable
    weight) for three numbers; they are computed on the host now, with the same numbers."""
    from training.methods.ewc import fisher_stats

    gen = torch.Generator().manual_seed(0)
    plain = {"a": torch.rand(100, generator=gen), "b": torch.rand(50, 2, generator=gen),
             "c": torch.rand(3, generator=gen)}
    flat = torch.cat([f.flatten() for f in plain.values()])
    assert fisher_stats(plain) == {"sum": float(flat.sum()), "mean": float(flat.mean()), "max": float(flat.max())}
    _OnDevice.largest = 0
    assert fisher_stats({n: f.as_subclass(_OnDevice) for n, f in plain.items()}) == fisher_stats(plain)
    assert _OnDevice.largest <= 100 < flat.numel(), "a flat copy of the Fisher was made on the device"
