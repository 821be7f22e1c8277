"""Stream metrics against numbers worked out by hand (docs/metrics.md §10)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from eval_and_metrics.stream_metrics import derive_stream_metrics, row_summary, rows_by_task, stream_metrics

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


# --------------------------------------------------------------------------------------------
# Edges the tests above leave open (each kills a mutant scripts/mutation.py found; docs/mutation.md)


def test_every_key_of_a_stream_and_a_missing_cell_is_none_and_left_out_of_every_mean():
    r = R.copy()
    r[0][1] = np.nan  # task b's base score is missing: FWT uses task c only, the matrix shows null
    m = stream_metrics(["a", "b", "c"], ["acc", "em", "f1"], [True] * 3, r, [10, 20, 10])
    assert m["tasks"] == ["a", "b", "c"]
    assert m["primary_metric"] == {"a": "acc", "b": "em", "c": "f1"}
    assert m["higher_is_better"] == {"a": True, "b": True, "c": True}
    assert m["eval_counts"] == {"a": 10, "b": 20, "c": 10}
    assert m["base_solved_margin"] == 0.02
    assert m["matrix"][0] == [0.1, None, 0.0]
    assert m["higher_is_better_summary"]["fwt"] == pytest.approx(0.2 - 0.0)  # (R[2][c] - R[0][c]) only


def test_the_shape_error_names_the_shape_wanted():
    with pytest.raises(ValueError, match=r"must be \(3, 2\) .* got \(2, 2\)"):
        stream_metrics(["a", "b"], ["acc"] * 2, [True] * 2, np.zeros((2, 2)), [1, 1])


def test_a_base_exactly_at_the_margin_is_base_solved():
    r = np.array([[0.0], [0.52]])
    r[0][0] = r[1][0] - 0.02  # the base scores exactly the just-trained score minus the margin
    assert stream_metrics(["a"], ["acc"], [True], r, [5])["base_solved"] == ["a"]


def test_a_single_task_stream_has_no_forgetting_and_no_micro_acc_without_items():
    m = stream_metrics(["a"], ["acc"], [True], np.array([[0.1], [0.6]]), [0])
    s = m["higher_is_better_summary"]
    assert s["acc"] == pytest.approx(0.6) and s["plasticity"] == pytest.approx(0.5)
    assert s["max_drop"] is None and s["bwt"] is None and s["forgetting"] is None
    assert s["acc_micro"] is None  # no eval item at all: undefined, not 0/0


def test_max_drop_is_zero_when_every_task_only_improves_after_training():
    r = np.array([[0.0, 0.0, 0.0], [0.5, 0.1, 0.1], [0.6, 0.5, 0.1], [0.7, 0.6, 0.5]])
    s = stream_metrics(["a", "b", "c"], ["acc"] * 3, [True] * 3, r, [1, 1, 1])["higher_is_better_summary"]
    assert s["max_drop"] == 0.0  # the drop at the just-trained row itself, never negative
    assert s["bwt"] == pytest.approx(((0.7 - 0.5) + (0.6 - 0.5)) / 2)


def test_fg_pct_skips_a_task_with_no_gain_without_dividing_by_zero():
    # task a gained nothing over the base (0.5 -> 0.5), then fell: its FG% is undefined, skipped
    r = np.array([[0.5, 0.0, 0.0], [0.5, 0.1, 0.0], [0.4, 0.8, 0.0], [0.3, 0.4, 0.7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 or x/0 would warn (and give nan or inf)
        s = stream_metrics(["a", "b", "c"], ["acc"] * 3, [True] * 3, r, [1, 1, 1])["higher_is_better_summary"]
    assert s["fg_pct"] == pytest.approx(100 * 0.4 / 0.8)  # task b only


def test_chaudhry_forgetting_never_counts_the_base_row():
    # task a scores 0.95 on the base, more than any trained row; neither convention counts row 0
    r = R.copy()
    r[0][0] = 0.95
    hi = stream_metrics(["a", "b", "c"], ["acc"] * 3, [True] * 3, r, [1, 1, 1])["higher_is_better_summary"]
    assert hi["forgetting_chaudhry"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.4)) / 2)
    nll = np.array([[1.0, 1.0, 3.0], [2.0, 1.9, 3.0], [2.2, 2.0, 3.0], [2.6, 2.4, 1.5]])  # base loss lowest
    lo = stream_metrics(["a", "b", "c"], ["nll"] * 3, [False] * 3, nll, [1, 1, 1])["lower_is_better_summary"]
    assert lo["forgetting_chaudhry"] == pytest.approx(((2.6 - 2.0) + (2.4 - 1.9)) / 2)
    # BWT of a loss: final minus just-trained, > 0 = forgetting
    assert lo["bwt"] == pytest.approx(((2.6 - 2.0) + (2.4 - 2.0)) / 2)
    assert lo["learning"] == pytest.approx(((2.0 - 1.0) + (2.0 - 1.9) + (1.5 - 3.0)) / 3)


class _Mean:
    """A stand-in scorer: its primary metric is the mean of the rows' "x", then "y" (missing -> None)."""

    def __init__(self, metrics: dict[str, bool]) -> None:
        self.metrics = metrics

    def aggregate(self, rows: list[dict]) -> dict[str, float]:
        first, second = list(self.metrics)
        out = {first: sum(r["x"] for r in rows) / len(rows)}
        ys = [r["y"] for r in rows if "y" in r]
        if ys:
            out[second] = ys[0]
        return out


def test_derive_stream_metrics_from_eval_rows_hand_computed():
    scorers = {"qa": _Mean({"em": True, "f1": True}), "lm": _Mean({"nll": False, "ppl": False})}

    def rows(qa: list[float], lm: float, y: object = None) -> list[dict]:
        out = [{"id": f"q{i}", "task": "qa", "x": x} for i, x in enumerate(qa)]
        out.append({"id": "l0", "task": "lm", "x": lm, **({"y": y} if y is not None else {})})
        return out

    per_state = [rows([0.0, 0.0], 3.0, y=float("nan")), rows([1.0, 0.0], 2.5, y=7), rows([1.0, 1.0], 2.0)]
    out = derive_stream_metrics(["qa", "lm"], ["exact_match", "perplexity"], scorers, [2, 1], per_state)
    assert out["matrix"] == [[0.0, 3.0], [0.5, 2.5], [1.0, 2.0]]
    assert out["primary_metric"] == {"qa": "em", "lm": "nll"}
    assert out["higher_is_better"] == {"qa": True, "lm": False}
    assert out["eval_counts"] == {"qa": 2, "lm": 1}
    assert out["higher_is_better_summary"]["acc"] == 1.0 and out["higher_is_better_summary"]["num_tasks"] == 1
    assert out["lower_is_better_summary"]["final"] == 2.0
    assert out["lower_is_better_summary"]["learning"] == pytest.approx(2.0 - 2.5)
    # every metric of every scorer as a column over the states; NaN and missing become None, ints floats
    assert out["matrices"] == {"qa": {"em": [0.0, 0.5, 1.0], "f1": [None, None, None]},
                               "lm": {"nll": [3.0, 2.5, 2.0], "ppl": [None, 7.0, None]}}
    assert isinstance(out["matrices"]["lm"]["ppl"][1], float)
    assert out["scorers"] == {"qa": {"name": "exact_match", "metrics": {"em": True, "f1": True}},
                              "lm": {"name": "perplexity", "metrics": {"nll": False, "ppl": False}}}
    summary = row_summary(["qa", "lm"], scorers, per_state[1])
    assert summary == {"qa": {"em": 0.5, "n": 2}, "lm": {"nll": 2.5, "ppl": 7, "n": 1}}


def test_rows_by_task_keeps_order_and_refuses_a_row_of_another_task():
    got = rows_by_task(["a", "b"], [{"id": 1, "task": "b"}, {"id": 2, "task": "a"}, {"id": 3, "task": "b"}])
    assert got == {"a": [{"id": 2, "task": "a"}], "b": [{"id": 1, "task": "b"}, {"id": 3, "task": "b"}]}
    assert rows_by_task(["a"], []) == {"a": []}
    with pytest.raises(ValueError, match="eval row 'x9' belongs to task 'z'"):
        rows_by_task(["a"], [{"id": "x9", "task": "z"}])
