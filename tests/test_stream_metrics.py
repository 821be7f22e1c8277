"""Stream metrics against numbers worked out by hand (docs/metrics.md §10)."""

from __future__ import annotations

import numpy as np
import pytest

from eval_and_metrics.stream_metrics import stream_metrics

R = np.array([
    [0.1, 0.2, 0.0],  # base
    [0.9, 0.3, 0.1],  # after task 1
    [0.3, 0.8, 0.2],  # after task 2
    [0.5, 0.4, 0.7],  # after task 3
])


def test_higher_is_better_metrics_match_the_hand_computation():
    m = stream_metrics(["a", "b", "c"], ["acc"] * 3, [True] * 3, R, [10, 20, 10])
    s = m["higher_is_better_summary"]
    assert s["acc"] == pytest.approx((0.5 + 0.4 + 0.7) / 3)
    assert s["acc_micro"] == pytest.approx((5 + 8 + 7) / 40)
    assert s["avg_acc_over_time"] == pytest.approx((0.9 + (0.3 + 0.8) / 2 + 1.6 / 3) / 3)
    assert s["bwt"] == pytest.approx(((0.5 - 0.9) + (0.4 - 0.8)) / 2)
    assert s["fwt"] == pytest.approx(((0.3 - 0.2) + (0.2 - 0.0)) / 2)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.4)) / 2)
    assert s["max_drop"] == pytest.approx(0.9 - 0.3)  # task a fell to 0.3 after task b
    assert s["fg_pct"] == pytest.approx(100 * (0.4 / 0.8 + 0.4 / 0.6) / 2)
    assert s["plasticity"] == pytest.approx(((0.9 - 0.1) + (0.8 - 0.3) + (0.7 - 0.2)) / 3)
    assert m["base_solved"] == [] and m["lower_is_better_summary"] == {}
    assert m["matrix"][0] == [0.1, 0.2, 0.0]


def test_forgetting_in_both_conventions_hand_computed():
    r = R.copy()
    r[1][1] = 0.85  # task b already scores 0.85 after task a, before it is trained; 0.8 right after
    hi = stream_metrics(["a", "b", "c"], ["acc"] * 3, [True] * 3, r, [10, 20, 10])["higher_is_better_summary"]
    assert hi["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.4)) / 2)  # ours: rows after training
    assert hi["forgetting_chaudhry"] == pytest.approx(((0.9 - 0.5) + (0.85 - 0.4)) / 2)  # every row 1..T-1
    nll = np.array([[3.0, 3.0, 3.0], [2.0, 1.9, 3.0], [2.2, 2.0, 3.0], [2.6, 2.4, 1.5]])
    lo = stream_metrics(["a", "b", "c"], ["nll_per_token"] * 3, [False] * 3, nll, [5, 5, 5])["lower_is_better_summary"]
    assert lo["forgetting"] == pytest.approx(((2.6 - 2.0) + (2.4 - 2.0)) / 2)
    assert lo["forgetting_chaudhry"] == pytest.approx(((2.6 - 2.0) + (2.4 - 1.9)) / 2)


def test_lower_is_better_tasks_are_summarised_apart_and_base_solved_tasks_are_flagged():
    r = np.array([
        [0.8, 3.0],   # base: task a already at 0.8 accuracy; task b NLL 3.0
        [0.81, 2.9],
        [0.5, 2.0],
    ])
    m = stream_metrics(["a", "b"], ["acc", "nll_per_token"], [True, False], r, [5, 5])
    hi, lo = m["higher_is_better_summary"], m["lower_is_better_summary"]
    assert hi["num_tasks"] == 1 and hi["acc"] == pytest.approx(0.5)  # b's NLL never enters an accuracy mean
    assert lo["num_tasks"] == 1 and lo["final"] == pytest.approx(2.0)
    assert lo["learning"] == pytest.approx(2.0 - 2.9)
    assert lo["bwt"] is None  # the last task cannot be forgotten
    assert m["base_solved"] == ["a"]  # 0.8 >= 0.81 - 0.02: its later drop is drift, not forgetting


def test_the_matrix_shape_is_checked():
    with pytest.raises(ValueError, match="base row"):
        stream_metrics(["a", "b"], ["acc"] * 2, [True] * 2, np.zeros((2, 2)), [1, 1])
