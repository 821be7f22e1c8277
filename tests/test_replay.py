"""Replay and the joint bound: which items a period trains on, the buffer policies (reservoir uniformity,
per-period quotas), determinism and the state round trip (training/methods/replay.py, joint.py)."""

from __future__ import annotations

import io
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data.schema import Period
from training.batching import PeriodData
from training.methods.adapted import AdaptedOptions
from training.methods.base import MethodContext
from training.methods.joint import Joint
from training.methods.replay import Replay, ReplayOptions, per_period_quota

MODEL = None  # neither method looks at the model


def _ctx(seed: int = 0) -> MethodContext:
    return MethodContext(tokenizer=SimpleNamespace(pad_token_id=0), device=torch.device("cpu"), seed=seed, lr=1e-3,
                         period_names=[])


def _period(k: int) -> Period:
    return Period(index=k, name=f"p{k}", passages=(), probes=())


def _items(k: int, n: int) -> list[str]:
    return [f"period {k} item {i} é" for i in range(n)]


def _run_period(method, k: int, texts: list[str]) -> list[str]:
    """What the trainer does with the data hooks: start, (train), end with the tokenised data."""
    mixed = method.on_period_start(MODEL, _period(k), texts)
    method.on_period_end(MODEL, _period(k), PeriodData(texts=mixed, token_ids=[[1]] * len(mixed)))
    return mixed


def _replay(seed: int = 0, **options) -> Replay:
    return Replay(ReplayOptions(**options), _ctx(seed))


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_period_gets_its_own_items_plus_the_expected_number_of_earlier_ones():
    method = _replay(buffer_size=50, ratio=0.25)
    assert _run_period(method, 1, _items(1, 12)) == _items(1, 12)  # nothing to replay yet
    _run_period(method, 2, _items(2, 12))
    own = _items(3, 10) + [_items(1, 12)[0]]  # a text of period 1 that period 3 trains again is not "replayed"
    mixed = method.on_period_start(MODEL, _period(3), own)
    assert mixed[:len(own)] == own
    replayed = mixed[len(own):]
    assert len(replayed) == round(0.25 * 11) == 3
    assert len(set(replayed)) == 3 and not set(replayed) & set(own)
    assert set(replayed) <= set(_items(1, 12) + _items(2, 12))
    # never more than the buffer holds
    small = _replay(buffer_size=2, ratio=1.0)
    _run_period(small, 1, _items(1, 5))
    assert len(small.on_period_start(MODEL, _period(2), _items(2, 8))) == 8 + 2


def test_replayed_items_are_not_added_to_the_buffer_again():
    method = _replay(buffer_size=100, ratio=1.0)
    _run_period(method, 1, _items(1, 6))
    mixed = _run_period(method, 2, _items(2, 6))
    assert len(mixed) == 12
    assert Counter(method.texts) == Counter(_items(1, 6) + _items(2, 6))
    report = method.eval_extras(MODEL, [])
    assert report["replay_items_per_period"] == {"p1": 6, "p2": 6} and report["replay_items"] == 12
    assert report["replay_bytes"] == sum(len(t.encode("utf-8")) for t in method.texts)
    assert report["replay_bytes"] > sum(len(t) for t in method.texts)  # UTF-8 bytes, not characters


def test_reservoir_keeps_a_uniform_sample_of_the_stream():
    """10 of 1000 items over 5 periods, 300 seeds: each period's share and each position decile's
    inclusion rate are B/N, within four standard deviations."""
    size, periods, per, seeds = 10, 5, 200, 300
    by_period = np.zeros(periods)
    by_decile = np.zeros(10)
    for seed in range(seeds):
        method = _replay(seed, buffer_size=size, policy="reservoir")
        for k in range(1, periods + 1):
            method.add(_period(k), _items(k, per))
        assert len(method.texts) == size and method.num_seen == periods * per
        for text, k in zip(method.texts, method.origin):
            by_period[k - 1] += 1
            position = (k - 1) * per + int(text.split()[3])
            by_decile[position * 10 // (periods * per)] += 1
    expected_period = seeds * size / periods  # 600
    sd_period = np.sqrt(seeds * size * (1 / periods) * (1 - 1 / periods))
    assert np.all(np.abs(by_period - expected_period) < 4 * sd_period), by_period
    expected_decile = seeds * size / 10
    sd_decile = np.sqrt(seeds * size * 0.1 * 0.9)
    assert np.all(np.abs(by_decile - expected_decile) < 4 * sd_decile), by_decile


@pytest.mark.parametrize("size,counts", [(12, [[10], [6, 6], [4, 4, 4], [3, 3, 3, 3]]),
                                         (10, [[10], [5, 5], [4, 3, 3], [3, 3, 2, 2]])])
def test_per_period_keeps_an_equal_quota_of_each_period(size, counts):
    method = _replay(buffer_size=size, policy="per_period")
    for k, expected in enumerate(counts, start=1):
        method.add(_period(k), _items(k, 10))
        assert [method.origin.count(j) for j in range(1, k + 1)] == expected
        assert all(t in _items(j, 10) for t, j in zip(method.texts, method.origin))
    assert [per_period_quota(10, 3, i) for i in range(3)] == [4, 3, 3]


@pytest.mark.parametrize("policy", ["reservoir", "per_period"])
def test_same_seed_same_buffer_and_mix_and_a_resumed_copy_continues_identically(policy):
    def run(seed: int) -> tuple[Replay, list[list[str]]]:
        method = _replay(seed, buffer_size=8, policy=policy, ratio=0.5)
        return method, [_run_period(method, k, _items(k, 10)) for k in (1, 2, 3)]

    a, mixed_a = run(0)
    b, mixed_b = run(0)
    assert a.state_dict() == b.state_dict() and mixed_a == mixed_b
    c, mixed_c = run(1)
    assert (c.texts, mixed_c) != (a.texts, mixed_a)

    resumed = _replay(0, buffer_size=8, policy=policy, ratio=0.5)
    resumed.load_state_dict(_round_trip(a.state_dict()))
    assert resumed.state_dict() == a.state_dict()
    assert _run_period(resumed, 4, _items(4, 10)) == _run_period(a, 4, _items(4, 10))
    assert resumed.state_dict() == a.state_dict()


def test_joint_trains_every_earlier_period_with_this_one_and_is_a_bound():
    assert Joint.is_bound
    method = Joint(AdaptedOptions(), _ctx())
    assert _run_period(method, 1, _items(1, 3)) == _items(1, 3)
    assert _run_period(method, 2, _items(2, 2)) == _items(1, 3) + _items(2, 2)
    copy = Joint(AdaptedOptions(), _ctx(5))
    copy.load_state_dict(_round_trip(method.state_dict()))
    assert copy.state_dict() == method.state_dict()
    assert copy.on_period_start(MODEL, _period(3), _items(3, 1)) == _items(1, 3) + _items(2, 2) + _items(3, 1)
    assert method.eval_extras(MODEL, []) == {"joint_items": 5, "joint_items_per_period": {"p1": 3, "p2": 2}}
