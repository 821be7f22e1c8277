"""ewc_replay: replay's data and EWC's penalty in one method, both live from the second period on, and a
state that keeps both (training/methods/ewc_replay.py)."""

from __future__ import annotations

import torch

from tests.test_ewc import DATA, TinyLM, _period
from training.methods.base import MethodContext
from training.methods.ewc_replay import EWCReplay, EWCReplayOptions


def _method(**options) -> EWCReplay:
    from types import SimpleNamespace

    ctx = MethodContext(tokenizer=SimpleNamespace(pad_token_id=0), device=torch.device("cpu"), seed=0, lr=1e-3,
                        period_names=["2018", "2020", "2022"])
    return EWCReplay(EWCReplayOptions(on="full", **options), ctx)


def test_second_period_mixes_earlier_items_and_pays_the_penalty_of_the_first():
    model = TinyLM()
    method = _method(lam=10.0, ratio=1.0, buffer_size=10)
    texts = method.on_period_start(model, _period(1), list(DATA.texts))
    assert texts == list(DATA.texts)  # nothing earlier to replay in period 1
    method.on_period_end(model, _period(1), DATA)
    second = ["d", "e"]
    mixed = method.on_period_start(model, _period(2), second)
    assert mixed[:2] == second and len(mixed) == 4 and set(mixed[2:]) <= set(DATA.texts)
    assert method.extra_loss(model, {}, None) is not None  # at the anchor the penalty is 0, but it is on
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    penalty = method.extra_loss(model, {}, None)
    assert penalty is not None and float(penalty) > 0
    assert method.step_stats()["ewc_penalty"] == float(penalty)
    extras = method.eval_extras(model, [])
    assert extras["ewc_pairs"] == 1 and extras["replay_items"] == 3


def test_state_holds_the_fisher_and_the_buffer_and_round_trips():
    model = TinyLM()
    method = _method(lam=10.0)
    method.on_period_start(model, _period(1), list(DATA.texts))
    method.on_period_end(model, _period(1), DATA)
    state = method.state_dict()
    other = _method(lam=10.0)
    other.load_state_dict(state)
    assert other.replay.texts == method.replay.texts
    assert all(torch.equal(other.fishers[0][n], f) for n, f in method.fishers[0].items())
    assert other.on_period_start(model, _period(2), ["d"]) == method.on_period_start(model, _period(2), ["d"])
