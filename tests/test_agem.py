"""A-GEM (training/methods/agem.py): the projection against the closed form and a brute-force search,
after_backward on a tiny model against a reference gradient computed apart, the memory, and the state
round trip in the middle of a period."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from data import DataConfig, load_benchmark
from training.batching import PeriodData, collate, tokenize
from training.config import ModelConfig
from training.methods import METHODS, MethodContext
from training.methods.agem import AgemOptions, project
from training.models import build_synthetic


# -- the projection -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_projection_is_the_closest_point_of_the_half_space(seed):
    gen = torch.Generator().manual_seed(seed)
    dim = [2, 3, 17, 1000][seed % 4]
    g = torch.randn(dim, generator=gen, dtype=torch.float64)
    r = torch.randn(dim, generator=gen, dtype=torch.float64)
    if g @ r >= 0:
        g = g - 2 * (g @ r) / (r @ r) * r  # reflect so the constraint is violated
    assert g @ r < 0
    p = project(g, r)
    assert p @ r >= -1e-12 * (g.norm() * r.norm())  # feasible, on the boundary
    assert abs(float(p @ r)) <= 1e-10 * float(g.norm() * r.norm())
    # closed form of the Euclidean projection onto {x: x.r >= 0}: remove g's component along r
    r_hat = r / r.norm()
    assert torch.allclose(p, g - (g @ r_hat) * r_hat, atol=1e-12)
    # every other feasible point is farther from g
    for _ in range(200):
        x = torch.randn(dim, generator=gen, dtype=torch.float64) * 2
        if x @ r < 0:
            x = x - (x @ r) / (r @ r) * r * (1 + torch.rand(1, generator=gen, dtype=torch.float64))
        assert x @ r >= -1e-12
        assert (x - g).norm() >= (p - g).norm() - 1e-12
    # and feasible points near p, along the boundary and inward, too
    for _ in range(50):
        d = torch.randn(dim, generator=gen, dtype=torch.float64) * 1e-3
        x = p + d
        if x @ r >= 0:
            assert (x - g).norm() >= (p - g).norm() - 1e-12


def test_projection_matches_a_brute_force_search_in_2d():
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    r = torch.tensor([0.5, 1.0], dtype=torch.float64)
    grid = torch.linspace(-3, 3, 1201, dtype=torch.float64)
    xs = torch.cartesian_prod(grid, grid)
    feasible = xs[xs @ r >= 0]
    best = feasible[(feasible - g).norm(dim=1).argmin()]
    assert torch.allclose(project(g, r), best, atol=6 / 1200)


def test_projection_leaves_g_alone_when_it_agrees_with_the_reference():
    g = torch.tensor([1.0, 2.0, -1.0])
    for r in (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([2.0, -1.0, 0.0]), torch.zeros(3)):  # dot > 0, = 0, r = 0
        assert project(g, r) is g


# -- the method on a tiny model -------------------------------------------------------------------

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("temporalwiki", DataConfig(num_facts=8))


def _fresh(bench, seed: int = 0, **options):
    model, tok = build_synthetic(ModelConfig(), bench, seed=0)
    ctx = MethodContext(tokenizer=tok, device=torch.device("cpu"), seed=0, lr=1e-3, period_names=bench.period_names)
    method = METHODS["agem"](replace(AgemOptions(), **options), ctx)
    torch.manual_seed(seed)
    return method.prepare(model), tok, method


def _texts(period, n: int = 6):
    return [p.text for p in period.passages[:n]]


def _with_memory(bench, **options):
    """A method that finished period 1 (memory filled) and started period 2."""
    model, tok, method = _fresh(bench, **options)
    p1, p2 = bench.periods[0], bench.periods[1]
    method.on_period_start(model, p1, _texts(p1))
    method.on_period_end(model, p1, tokenize(tok, _texts(p1, 100), 64))
    method.on_period_start(model, p2, _texts(p2))
    return model, tok, method


def _reference_gradient(model, batch) -> torch.Tensor:
    """g_ref computed apart: the LM loss gradient of the memory batch, in eval mode."""
    model.eval()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    g_ref = torch.cat([p.grad.flatten() for p in params]).clone()
    model.zero_grad(set_to_none=True)
    model.train()
    return g_ref


def _set_grads(model, flat: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    for p, chunk in zip(params, torch.split(flat, [p.numel() for p in params])):
        p.grad = chunk.view_as(p).clone()


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def test_after_backward_replaces_the_gradient_with_its_projection(bench):
    model, tok, method = _with_memory(bench, ref_batch=4)
    g_ref = _reference_gradient(model, method.reference_batch(0))
    assert g_ref.norm() > 0
    noise = torch.randn(g_ref.shape, generator=torch.Generator().manual_seed(3)) * g_ref.abs().mean()
    g = -g_ref + noise  # against the memory's gradient
    assert g @ g_ref < 0
    _set_grads(model, g)
    model.train()
    method.after_backward(model)
    assert torch.allclose(_grads(model), project(g, g_ref), rtol=1e-5, atol=1e-8)
    assert abs(float(_grads(model) @ g_ref)) <= 1e-4 * float(g.norm() * g_ref.norm())
    stats = method.step_stats()
    assert stats["agem_projected"] == 1.0 and stats["agem_dot"] == pytest.approx(float(g @ g_ref), rel=1e-4)
    assert all(m.training for m in model.modules()), "the training mode is restored"

    # step 1 draws its own batch; a gradient that agrees with it is put back bit for bit
    g_ref1 = _reference_gradient(model, method.reference_batch(1))
    g1 = g_ref1 + noise
    _set_grads(model, g1)
    method.after_backward(model)
    assert torch.equal(_grads(model), g1)
    assert method.step_stats()["agem_projected"] == 0.0 and method.step_stats()["agem_dot"] > 0


def test_period_one_is_a_no_op_and_the_memory_is_chosen_once_per_period(bench):
    model, tok, method = _fresh(bench, memory_per_period=5)
    p1, p2 = bench.periods[0], bench.periods[1]
    method.on_period_start(model, p1, _texts(p1))
    g = torch.randn(sum(p.numel() for p in model.parameters() if p.requires_grad))
    _set_grads(model, g)
    method.after_backward(model)
    assert torch.equal(_grads(model), g) and method.step_stats() == {"agem_projected": 0.0, "agem_dot": 0.0}
    assert method.state_dict()["step"] == 1

    data = PeriodData(texts=["a"] * 8, token_ids=[[i, i + 1, i + 2] for i in range(8)], num_masked=[1] * 8)
    method.on_period_end(model, p1, data)
    first = method.state_dict()
    assert len(first["token_ids"]) == 5 and first["num_masked"] == [1] * 5 and first["periods"] == [1] * 5
    assert all(t in data.token_ids for t in first["token_ids"])
    method.on_period_end(model, p1, data)  # a resume that redoes the period's end does not duplicate it
    assert method.state_dict()["token_ids"] == first["token_ids"]
    method.on_period_start(model, p2, [])
    method.on_period_end(model, p2, PeriodData(texts=["b"] * 2, token_ids=[[5, 5], [6, 6, 6]]))  # fewer than 5
    state = method.state_dict()
    assert state["periods"] == [1] * 5 + [2] * 2 and state["num_masked"][-2:] == [0, 0]
    tokens = 15 + 5
    assert method.eval_extras(model, []) == {"agem_memory_items": 7, "agem_memory_tokens": tokens,
                                             "agem_memory_bytes": 8 * tokens}


def test_reference_batches_are_seeded_by_period_and_step(bench):
    _, tok, a = _with_memory(bench, ref_batch=3)
    _, _, b = _with_memory(bench, ref_batch=3)

    def items(batch):  # the batch's items, whatever their order
        rows = zip(batch["input_ids"], batch["attention_mask"])
        return sorted(tuple(ids[mask.bool()].tolist()) for ids, mask in rows)
    assert all(torch.equal(a.reference_batch(s)["input_ids"], b.reference_batch(s)["input_ids"]) for s in range(4))
    assert len({tuple(items(a.reference_batch(s))) for s in range(8)}) > 1, "steps draw different batches"
    assert len(items(a.reference_batch(0))) == 3


def test_state_round_trips_in_the_middle_of_a_period(bench, tmp_path):
    model, tok, method = _with_memory(bench, ref_batch=4)
    batch = collate(tokenize(tok, _texts(bench.periods[1]), 64).token_ids, tok.pad_token_id)
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
    for _ in range(3):
        model.train()
        model(**batch).loss.backward()
        method.after_backward(model)
        opt.step()
        opt.zero_grad()
    trainable, state = method.trainable_state_dict(model), method.state_dict()
    torch.save(state, tmp_path / "method_state.pt")

    other, _, other_method = _fresh(bench, seed=1, ref_batch=4)
    other_method.on_period_start(other, bench.periods[1], [])
    other_method.load_trainable_state_dict(other, trainable)
    other_method.load_state_dict(torch.load(tmp_path / "method_state.pt", weights_only=True))
    assert other_method.state_dict() == state and state["step"] == 3
    for m, meth in ((model, method), (other, other_method)):
        m.train()
        m.zero_grad(set_to_none=True)
        m(**batch).loss.backward()
        meth.after_backward(m)
    assert torch.equal(_grads(model), _grads(other))
    assert method.step_stats() == other_method.step_stats()


def test_the_projection_makes_no_flat_copy_of_the_gradients(bench, monkeypatch):
    """Issue 25: on a GPU, flattening g and g_ref into fp32 vectors held two more model-sized copies
    (four at bf16); the projection now goes parameter by parameter, with the same numbers."""
    model, tok, method = _with_memory(bench, ref_batch=4, on="full")
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g_ref = _reference_gradient(model, method.reference_batch(0))
    g = -g_ref + torch.randn(g_ref.shape, generator=torch.Generator().manual_seed(3)) * g_ref.abs().mean()
    _set_grads(model, g)
    model.train()
    widest = []
    cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: widest.append(cat(*a, **k).numel()) or cat(*a, **k))
    method.after_backward(model)
    monkeypatch.undo()
    assert widest and max(widest) < total // 2, "a flat copy of the gradients was made"
    assert method.step_stats()["agem_projected"] == 1.0
    got, want = _grads(model), project(g, g_ref)
    assert float((got - want).norm()) <= 1e-5 * float(want.norm())
