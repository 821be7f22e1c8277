"""Mechanism tests of O-LoRA (training/methods/olora.py) on a tiny random Llama.

What the method promises: the orthogonality penalty is sum |A_old A_new^T| (a hand computation, and zero
for orthogonal subspaces); earlier adapters stay frozen and active in later periods; only the new adapter
gets gradients; each adapter's init is a function of (seed, k) wherever it is created, without touching
the global RNG; a fresh model can load the state of any period.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.schema import Period
from training.methods import METHODS, MethodContext, adapters
from training.methods.olora import OLoRA, OLoraOptions, orthogonality_loss

VOCAB = 50
NAMES = ["a", "b", "c"]


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make(opts: OLoraOptions | None = None, seed: int = 0):
    ctx = MethodContext(tokenizer=None, device=torch.device("cpu"), seed=seed, lr=1e-2, period_names=NAMES)
    method = OLoRA(opts or OLoraOptions(r=4, alpha=8), ctx)
    return method.prepare(tiny_llama()), method


def period(k: int) -> Period:
    return Period(index=k, name=NAMES[k - 1], passages=(), probes=())


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def logits(model, b) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def train(model, method, k: int, steps: int = 3) -> None:
    method.on_period_start(model, period(k), [])
    opt = torch.optim.AdamW(method.trainable_parameters(model), lr=1e-2)
    for s in range(steps):
        model.train()
        b = batch(10 * k + s)
        out = model(**b)
        loss = out.loss + (method.extra_loss(model, b, out) or 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def adapter_params(model, k: int) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if adapters.param_adapter(n) == k}


def test_registered():
    assert METHODS["olora"] is OLoRA


def test_orthogonality_loss_by_hand():
    old = [torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[0.0, 0.0, -2.0], [1.0, 0.0, 0.0]])]
    new = torch.tensor([[1.0, -1.0, 3.0], [0.0, 1.0, 0.0]])
    # old[0] @ new.T = [[1 - 2, 2]]            -> |.| sums to 3
    # old[1] @ new.T = [[-6, 0], [1, 0]]       -> |.| sums to 7
    assert orthogonality_loss(old, new).item() == 10.0
    assert orthogonality_loss([], new).item() == 0.0
    # rows spanning orthogonal subspaces (disjoint coordinates here, then rotated): exactly zero
    assert orthogonality_loss([torch.eye(4)[:2]], torch.eye(4)[2:]).item() == 0.0
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert orthogonality_loss([q[:3]], q[3:]).abs().item() < 1e-12


def test_penalties_match_a_hand_sum_over_modules_and_the_weights_apply():
    model, method = make(OLoraOptions(r=4, alpha=8, ortho_weight=0.5, l2_weight=0.25))
    train(model, method, 1)
    train(model, method, 2)
    method.on_period_start(model, period(3), [])
    expected_ortho, expected_l2, num_layers = 0.0, 0.0, 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "period_3" in module.lora_A:
            num_layers += 1
            a3 = module.lora_A["period_3"].weight
            for j in ("period_1", "period_2"):
                expected_ortho += (module.lora_A[j].weight @ a3.T).abs().sum().item()
            expected_l2 += a3.norm().item() + module.lora_B["period_3"].weight.norm().item()
    assert num_layers == 2 * 7  # every target module of both layers
    b = batch()
    out = model(**b)
    extra = method.extra_loss(model, b, out)
    stats = method.step_stats()
    assert set(stats) == {"olora_ortho", "olora_l2"}
    assert stats["olora_ortho"] == pytest.approx(expected_ortho, rel=1e-5)
    assert stats["olora_l2"] == pytest.approx(expected_l2, rel=1e-5)
    assert extra.item() == pytest.approx(0.5 * expected_ortho + 0.25 * expected_l2, rel=1e-5)


def test_penalty_is_zero_for_orthogonal_subspaces_in_the_model():
    model, method = make()
    train(model, method, 1)
    method.on_period_start(model, period(2), [])
    with torch.no_grad():  # give the two adapters' A disjoint input coordinates in every module
        for layer in adapters.lora_layers(model):
            a1, a2 = layer.lora_A["period_1"].weight, layer.lora_A["period_2"].weight
            a1[:, a1.shape[1] // 2:] = 0
            a2[:, :a2.shape[1] // 2] = 0
    ortho, _ = method.penalties(model)
    assert ortho.item() == 0.0
    b = batch()
    method.extra_loss(model, b, model(**b))
    assert method.step_stats()["olora_ortho"] == 0.0


def test_period_one_has_no_penalty_and_zero_weights_add_nothing():
    model, method = make(OLoraOptions(r=4, alpha=8, ortho_weight=0.0, l2_weight=0.0))
    train(model, method, 1)
    method.on_period_start(model, period(2), [])
    b = batch()
    assert method.extra_loss(model, b, model(**b)) is None
    assert method.step_stats()["olora_ortho"] > 0  # still logged
    model, method = make()
    method.on_period_start(model, period(1), [])
    method.extra_loss(model, b, model(**b))
    assert method.step_stats()["olora_ortho"] == 0.0


def test_earlier_adapters_are_frozen_active_and_gradients_reach_only_the_new_one():
    model, method = make()
    base = logits(tiny_llama(), batch())
    train(model, method, 1)
    after_1 = logits(model, batch())
    old = adapter_params(model, 1)
    method.on_period_start(model, period(2), [])
    # B_2 starts at zero, so with period 1's adapter still active the model computes what it did after period 1
    assert torch.equal(logits(model, batch()), after_1)
    assert not torch.allclose(after_1, base)

    model.train()
    b = batch()
    out = model(**b)
    (out.loss + method.extra_loss(model, b, out)).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(adapter_params(model, 2)), "only the new adapter gets gradients"
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad if ".lora_A." in n), \
        "the orthogonality penalty reaches A_2 even while B_2 is zero"
    model.zero_grad(set_to_none=True)

    before_2 = adapter_params(model, 2)
    train(model, method, 2)
    assert all(torch.equal(p, old[n]) for n, p in adapter_params(model, 1).items()), "period 1's adapter changed"
    assert any(not torch.equal(p, before_2[n]) for n, p in adapter_params(model, 2).items())
    both = logits(model, batch())
    adapters.activate(model, [2], None)  # the base model with only the new adapter
    assert not torch.allclose(both, logits(model, batch())), "period 1's adapter must stay active"
    method.on_period_start(model, period(2), [])  # back to the training state
    assert torch.equal(both, logits(model, batch()))
    assert model.base_model.active_adapters == ["period_1", "period_2"]


def test_on_period_start_is_idempotent_and_leaves_the_global_rng_alone():
    model, method = make()
    train(model, method, 1)
    rng = torch.get_rng_state()
    method.on_period_start(model, period(2), [])
    assert torch.equal(torch.get_rng_state(), rng), "adapter creation must not draw from the trainer's RNG"
    train(model, method, 2)
    state = method.trainable_state_dict(model)
    method.on_period_start(model, period(2), [])  # as a step resume calls it again
    again = method.trainable_state_dict(model)
    assert state.keys() == again.keys() and all(torch.equal(state[k], again[k]) for k in state)


def test_adapter_init_is_the_same_wherever_it_is_created():
    model, method = make()
    method.on_period_start(model, period(2), [])
    created = adapter_params(model, 2)
    other, other_method = make()
    torch.manual_seed(123)  # a different global RNG must not matter
    other_method.load_trainable_state_dict(other, {n: p for n, p in method.trainable_state_dict(model).items()
                                                   if adapters.param_adapter(n) == 1})
    adapters.ensure(other, other_method.cfg, 2, other_method._seed(2))
    assert all(torch.equal(p, created[n]) for n, p in adapter_params(other, 2).items())
    _, seeded = make(seed=1)
    assert seeded._seed(2) != method._seed(2)


def test_a_fresh_model_loads_the_state_of_any_period():
    model, method = make()
    for k in (1, 2, 3):
        train(model, method, k, steps=2)
    state = method.trainable_state_dict(model)
    assert {adapters.param_adapter(n) for n in state} == {1, 2, 3}, "every adapter is in the state"
    fresh, fresh_method = make(seed=1)  # different inits: the load must overwrite them
    fresh_method.load_trainable_state_dict(fresh, state)
    assert torch.equal(logits(fresh, batch()), logits(model, batch()))
    assert adapters.adapters(fresh) == [1, 2, 3]
    assert fresh.base_model.active_adapters == ["period_1", "period_2", "period_3"]
    assert not any(p.requires_grad for p in fresh.parameters()), "nothing trains before on_period_start"
    fresh_method.on_period_start(fresh, period(3), [])
    assert {adapters.param_adapter(n) for n, p in fresh.named_parameters() if p.requires_grad} == {3}
    with pytest.raises(RuntimeError, match="non-adapter"):
        fresh_method.load_trainable_state_dict(fresh, {"model.embed_tokens.weight": torch.zeros(1)})


def test_an_embedding_target_is_an_adapter_like_the_others() -> None:
    """The synthetic preset adapts embed_tokens too: its per-period tensors must be recognised as adapter
    tensors (trained, saved, reloaded), start at exactly zero effect and enter the penalties."""
    targets = ["q_proj", "v_proj", "embed_tokens"]
    model, method = make(OLoraOptions(r=4, alpha=8, target_modules=targets))
    names = [n for n, _ in model.named_parameters() if "lora_embedding" in n]
    assert names and all(adapters.param_adapter(n) == 1 for n in names)
    b = batch()
    torch.testing.assert_close(logits(model, b), logits(tiny_llama(), b), rtol=0, atol=0)
    train(model, method, 1)
    train(model, method, 2)
    state = method.trainable_state_dict(model)
    assert {n for n in state if "lora_embedding" in n} >= {n.replace("period_1", "period_2") for n in names}
    fresh, other = make(OLoraOptions(r=4, alpha=8, target_modules=targets))
    other.current = 2
    other.load_trainable_state_dict(fresh, state)
    torch.testing.assert_close(logits(fresh, b), logits(model, b))
    ortho, _ = method.penalties(model)
    assert float(ortho) > 0  # the embedding adapter's A of period 2 against period 1's
