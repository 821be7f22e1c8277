"""Continual-learning metrics against hand-computed values (formulas in docs/metrics.md)."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

from data.schema import Probe
from eval_and_metrics.metrics import (
    _json_safe,
    _matrix_metrics,
    answer_kind,
    answer_kind_rates,
    value_history,
    average_accuracy,
    backward_transfer,
    derive_metrics,
    forgetting,
    forward_transfer,
    plasticity,
    routing_accuracy,
    score_matrix,
    stability,
    temporal_recall,
)

PERIODS = ["2020", "2021", "2022"]


def make_probe(
    pid: str,
    period: str,
    kind: str,
    valid_from: str,
    valid_until: str | None,
    family: str = "storage",
) -> Probe:
    return Probe(
        id=pid,
        subject=pid[0],
        relation="rel",
        value=f"value-{pid}",
        period=period,
        valid_from=valid_from,
        valid_until=valid_until,
        previous_value=None,
        kind=kind,  # type: ignore[arg-type]
        family=family,  # type: ignore[arg-type]
        prompt=f"In {period}, {pid[0]} rel was",
        template_id="t0",
    )


# --------------------------------------------------------------------------------------------
# Matrix formulas on a hand-written R (T = 3; rows = base, after 2020, after 2021, after 2022)
#
#            p1    p2    p3
#   row 0   0.1   0.0   0.2
#   row 1   0.8   0.3   0.1
#   row 2   0.9   0.9   0.4
#   row 3   0.5   0.7   1.0
#
# ACC        = (0.5 + 0.7 + 1.0) / 3                              = 2.2 / 3 = 0.7333...
# BWT        = ((R31 - R11) + (R32 - R22)) / 2 = ((0.5-0.8) + (0.7-0.9)) / 2 = -0.25
# FWT        = ((R12 - R02) + (R23 - R03)) / 2 = ((0.3-0.0) + (0.4-0.2)) / 2 =  0.25
# forgetting = ((max(R11, R21) - R31) + (max(R22) - R32)) / 2
#            = ((0.9 - 0.5) + (0.9 - 0.7)) / 2                           =  0.30
# (BWT uses R11 = 0.8, forgetting the best row 0.9: they differ on purpose.)
HAND_R = np.array(
    [
        [0.1, 0.0, 0.2],
        [0.8, 0.3, 0.1],
        [0.9, 0.9, 0.4],
        [0.5, 0.7, 1.0],
    ]
)


def test_matrix_formulas_hand_computed() -> None:
    assert average_accuracy(HAND_R) == pytest.approx(2.2 / 3)
    assert backward_transfer(HAND_R) == pytest.approx(-0.25)
    assert forward_transfer(HAND_R) == pytest.approx(0.25)
    assert forgetting(HAND_R) == pytest.approx(0.30)


# Where the two forgetting conventions part: period 2's probes score 0.95 after period 1, before period 2
# is trained (an unchanged fact the model already answers), and only 0.6 right after it.
#            p1    p2    p3
#   row 0   0.1   0.0   0.2
#   row 1   0.8   0.95  0.1
#   row 2   0.9   0.6   0.4
#   row 3   0.5   0.5   1.0
# ours      = ((max(R11, R21) - R31) + (max(R22) - R32)) / 2      = ((0.9-0.5) + (0.6-0.5)) / 2  = 0.25
# Chaudhry  = ((max(R11, R21) - R31) + (max(R12, R22) - R32)) / 2 = ((0.9-0.5) + (0.95-0.5)) / 2 = 0.425
PRE_TRAINED_R = np.array([[0.1, 0.0, 0.2], [0.8, 0.95, 0.1], [0.9, 0.6, 0.4], [0.5, 0.5, 1.0]])


def test_forgetting_in_both_conventions_hand_computed() -> None:
    assert forgetting(PRE_TRAINED_R) == pytest.approx(0.25)
    assert forgetting(PRE_TRAINED_R, first_row=1) == pytest.approx(0.425)
    assert forgetting(HAND_R, first_row=1) == pytest.approx(0.30)  # no earlier row beats the trained ones
    out = _matrix_metrics(PRE_TRAINED_R, "_storage")
    assert out["forgetting_storage"] == pytest.approx(0.25)
    assert out["forgetting_chaudhry_storage"] == pytest.approx(0.425)


def test_matrix_formulas_single_period() -> None:
    r = np.array([[0.2], [0.6]])
    assert average_accuracy(r) == pytest.approx(0.6)
    # 1/(T-1) is undefined for T = 1: NaN here, None in derive_metrics.
    assert math.isnan(backward_transfer(r))
    assert math.isnan(forward_transfer(r))
    assert math.isnan(forgetting(r))


def test_score_matrix_reproduces_hand_matrix_and_derive_metrics() -> None:
    # One standard probe per period whose score in row k is HAND_R[k, t].
    probes = [make_probe(f"{c}1", name, "new", name, None) for c, name in zip("abc", PERIODS)]
    rows = [{p.id: float(HAND_R[k, t]) for t, p in enumerate(probes)} for k in range(4)]
    np.testing.assert_allclose(score_matrix(rows, probes, PERIODS), HAND_R)
    out = derive_metrics(rows, rows, probes, PERIODS)
    assert out["acc_storage"] == pytest.approx(2.2 / 3)
    assert out["bwt_storage"] == pytest.approx(-0.25)
    assert out["fwt_storage"] == pytest.approx(0.25)
    assert out["forgetting_storage"] == pytest.approx(0.30)
    assert out["forgetting_storage_f1"] == pytest.approx(0.30)
    np.testing.assert_allclose(np.array(out["matrix_storage_em"], dtype=float), HAND_R)
    # no extraction probe: its matrix is all null, its metrics None (never mixed with storage)
    assert out["matrix_extraction_em"] == [[None] * 3] * 4 and out["acc_extraction"] is None


def test_score_matrix_nan_for_empty_selection() -> None:
    probes = [make_probe("a1", "2020", "new", "2020", None)]
    rows = [{"a1": 0.0}, {"a1": 1.0}, {"a1": 1.0}, {"a1": 0.0}]
    r = score_matrix(rows, probes, PERIODS)
    assert r.shape == (4, 3)
    assert r[:, 0].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert np.isnan(r[:, 1:]).all()


def test_score_matrix_missing_probe_raises() -> None:
    probes = [
        make_probe("a1", "2020", "new", "2020", None),
        make_probe("b1", "2020", "new", "2020", None),
    ]
    rows = [{"a1": 0.0, "b1": 0.0}, {"a1": 1.0, "b1": 1.0}, {"a1": 1.0}, {"a1": 1.0, "b1": 0.0}]
    with pytest.raises(ValueError, match="'b1'"):
        score_matrix(rows, probes, PERIODS)
    # a probe not selected need not be scored
    r = score_matrix(rows, probes, PERIODS, select=lambda p: p.id == "a1")
    assert r[2, 0] == 1.0
    with pytest.raises(ValueError, match="'b1'"):
        derive_metrics(rows, rows, probes, PERIODS)


def test_bad_inputs_raise() -> None:
    probes = [make_probe("a1", "2020", "new", "2020", None)]
    with pytest.raises(ValueError, match="T\\+1"):
        score_matrix([{"a1": 0.0}] * 3, probes, PERIODS)
    with pytest.raises(ValueError, match="'1999'"):
        score_matrix([{"x": 0.0}] * 4, [make_probe("x", "1999", "new", "1999", None)], PERIODS)
    with pytest.raises(ValueError, match="duplicate"):
        score_matrix([{"a1": 0.0}] * 4, probes * 2, PERIODS)
    with pytest.raises(ValueError, match="non-finite"):
        rows = [{"a1": 0.0}, {"a1": float("nan")}, {"a1": 0.0}, {"a1": 0.0}]
        score_matrix(rows, probes, PERIODS)


# --------------------------------------------------------------------------------------------
# Subset metrics on a hand-built benchmark of four facts over 2020, 2021, 2022.
#
#   fact A: a1 -> a2 -> a2     fact B: b1 -> b1 -> b3
#   fact C: c1 -> c2 -> c3     fact D: d1 -> d1 -> d1
#
#   (probe: kind, valid_until; no "until" = still true at the last period)
#   2020: A1 new, 2021        B1 new, 2022        C1 new, 2021        D1 new
#   2021: A2 changed          B2 unchanged, 2022  C2 changed, 2022    D2 unchanged
#   2022: A3 unchanged        B3 changed          C3 changed          D3 unchanged
#   extraction probes: P1 of A1 (2020), P2 of C2 (2021), P3 of D3 (2022); the others are storage
def hand_probes() -> list[Probe]:
    return [
        make_probe("A1", "2020", "new", "2020", "2021"),
        make_probe("B1", "2020", "new", "2020", "2022"),
        make_probe("C1", "2020", "new", "2020", "2021"),
        make_probe("D1", "2020", "new", "2020", None),
        make_probe("A2", "2021", "changed", "2021", None),
        make_probe("B2", "2021", "unchanged", "2020", "2022"),
        make_probe("C2", "2021", "changed", "2021", "2022"),
        make_probe("D2", "2021", "unchanged", "2020", None),
        make_probe("A3", "2022", "unchanged", "2021", None),
        make_probe("B3", "2022", "changed", "2022", None),
        make_probe("C3", "2022", "changed", "2022", None),
        make_probe("D3", "2022", "unchanged", "2020", None),
        make_probe("P1", "2020", "new", "2020", "2021", family="extraction"),
        make_probe("P2", "2021", "changed", "2021", "2022", family="extraction"),
        make_probe("P3", "2022", "unchanged", "2020", None, family="extraction"),
    ]


#                   A1 B1 C1 D1 | A2 B2 C2 D2 | A3 B3 C3 D3 | P1 P2 P3
_EM_TABLE = {
    0: "0  0  0  1  | 0  0  0  1  | 0  0  0  1  | 0  0  0",
    1: "1  1  0  1  | 0  1  0  1  | 0  0  0  1  | 1  0  0",
    2: "1  1  0  1  | 1  1  1  0  | 1  0  0  0  | 1  1  0",
    3: "0  1  1  1  | 1  0  1  1  | 1  1  0  0  | 0  1  0",
}
_IDS = ["A1", "B1", "C1", "D1", "A2", "B2", "C2", "D2", "A3", "B3", "C3", "D3", "P1", "P2", "P3"]


def hand_rows_em() -> list[dict[str, float]]:
    rows = []
    for k in range(4):
        values = [float(v) for v in _EM_TABLE[k].replace("|", " ").split()]
        rows.append(dict(zip(_IDS, values)))
    return rows


def hand_rows_f1() -> list[dict[str, float]]:
    # f1 = 0.5 * em + 0.5: every mean maps the same way, differences halve.
    return [{pid: 0.5 * v + 0.5 for pid, v in row.items()} for row in hand_rows_em()]


def test_plasticity_hand_computed() -> None:
    # k=1: 2020 new A1 B1 C1 D1 in row 1 = 1,1,0,1 -> 0.75
    # k=2: 2021 changed A2 C2 in row 2   = 1,1     -> 1.0
    # k=3: 2022 changed B3 C3 in row 3   = 1,0     -> 0.5
    assert plasticity(hand_rows_em(), hand_probes(), PERIODS) == pytest.approx([0.75, 1.0, 0.5])


def test_stability_hand_computed() -> None:
    # k=1: no unchanged probes -> NaN
    # k=2: 2021 unchanged B2 D2 in row 2 = 1,0 -> 0.5
    # k=3: 2022 unchanged A3 D3 in row 3 = 1,0 -> 0.5
    got = stability(hand_rows_em(), hand_probes(), PERIODS)
    assert math.isnan(got[0])
    assert got[1:] == pytest.approx([0.5, 0.5])


def test_temporal_recall_hand_computed() -> None:
    # k=1: no earlier period -> NaN
    # k=2: 2020 probes with valid_until <= 2021: A1, C1; row 2 = 1,0 -> 0.5
    # k=3: 2020/2021 probes with valid_until <= 2022: A1 B1 C1 B2 C2; row 3 = 0,1,1,0,1 -> 0.6
    #      (A2, D1, D2 are still true; P1, P2 are extraction probes and reported apart)
    got = temporal_recall(hand_rows_em(), hand_probes(), PERIODS)
    assert math.isnan(got[0])
    assert got[1:] == pytest.approx([0.5, 0.6])


def test_extraction_family_hand_computed() -> None:
    # P1 (2020 new, until 2021), P2 (2021 changed, until 2022), P3 (2022 unchanged); rows from _EM_TABLE
    rows = hand_rows_em()
    # plasticity: k=1 P1 in row 1 = 1; k=2 P2 in row 2 = 1; k=3 no new/changed extraction probe
    got = plasticity(rows, hand_probes(), PERIODS, family="extraction")
    assert got[:2] == [1.0, 1.0] and math.isnan(got[2])
    # stability: only P3 (k=3) in row 3 = 0
    got = stability(rows, hand_probes(), PERIODS, family="extraction")
    assert math.isnan(got[0]) and math.isnan(got[1]) and got[2] == 0.0
    # temporal recall: k=2 P1 in row 2 = 1; k=3 P1, P2 in row 3 = 0, 1 -> 0.5
    got = temporal_recall(rows, hand_probes(), PERIODS, family="extraction")
    assert math.isnan(got[0]) and got[1:] == pytest.approx([1.0, 0.5])
    with pytest.raises(ValueError, match="family must be one of storage, extraction"):
        plasticity(rows, hand_probes(), PERIODS, family="paraphrase")


def test_pooled_weighs_every_probe_once_per_period_mean_every_period_once() -> None:
    # period 2020: 4 new probes, all right; period 2021: 1 changed probe, wrong.
    probes = [make_probe(f"a{i}", "2020", "new", "2020", None) for i in range(4)]
    probes.append(make_probe("b0", "2021", "changed", "2021", None))
    row = {**{f"a{i}": 1.0 for i in range(4)}, "b0": 0.0}
    out = derive_metrics([row] * 3, [row] * 3, probes, PERIODS[:2])
    assert out["plasticity_storage"] == [1.0, 0.0]
    assert out["plasticity_storage_mean"] == pytest.approx(0.5)  # (1.0 + 0.0) / 2 periods
    assert out["plasticity_storage_pooled"] == pytest.approx(0.8)  # 4 right of 5 probes
    assert out["plasticity_storage_n"] == 5 and out["plasticity_storage_counts"] == [4, 1]
    assert out["stability_storage_pooled"] is None and out["stability_storage_n"] == 0


def test_derive_metrics_hand_computed() -> None:
    out = derive_metrics(hand_rows_em(), hand_rows_f1(), hand_probes(), PERIODS)

    # Storage matrix (4 probes per period):
    #   row 0: [1/4, 1/4, 1/4]   row 1: [3/4, 2/4, 1/4]
    #   row 2: [3/4, 3/4, 1/4]   row 3: [3/4, 3/4, 2/4]
    np.testing.assert_allclose(
        out["matrix_storage_em"],
        [[0.25, 0.25, 0.25], [0.75, 0.5, 0.25], [0.75, 0.75, 0.25], [0.75, 0.75, 0.5]],
    )
    # ACC = (0.75 + 0.75 + 0.5) / 3 = 2/3
    # BWT = ((0.75 - 0.75) + (0.75 - 0.75)) / 2 = 0
    # FWT = ((0.5 - 0.25) + (0.25 - 0.25)) / 2 = 0.125
    # forgetting = ((max(0.75, 0.75) - 0.75) + (0.75 - 0.75)) / 2 = 0
    assert out["acc_storage"] == pytest.approx(2 / 3)
    assert out["bwt_storage"] == pytest.approx(0.0)
    assert out["fwt_storage"] == pytest.approx(0.125)
    assert out["forgetting_storage"] == pytest.approx(0.0)
    # F1 = 0.5 * EM + 0.5: ACC -> 5/6, differences halve.
    assert out["acc_storage_f1"] == pytest.approx(5 / 6)
    assert out["bwt_storage_f1"] == pytest.approx(0.0)
    assert out["fwt_storage_f1"] == pytest.approx(0.0625)
    assert out["forgetting_storage_f1"] == pytest.approx(0.0)
    assert out["matrix_storage_f1"][0] == pytest.approx([0.625, 0.625, 0.625])

    assert out["plasticity_storage"] == pytest.approx([0.75, 1.0, 0.5])
    assert out["plasticity_storage_mean"] == pytest.approx(0.75)
    assert out["plasticity_storage_pooled"] == pytest.approx(6 / 8)  # 3 + 2 + 1 right of 4 + 2 + 2
    assert out["plasticity_storage_counts"] == [4, 2, 2] and out["plasticity_storage_n"] == 8
    assert out["stability_storage"][0] is None
    assert out["stability_storage"][1:] == pytest.approx([0.5, 0.5])
    assert out["stability_storage_mean"] == pytest.approx(0.5)
    assert out["stability_storage_pooled"] == pytest.approx(0.5)
    assert out["stability_storage_counts"] == [0, 2, 2] and out["stability_storage_n"] == 4
    assert out["temporal_recall_storage"][0] is None
    assert out["temporal_recall_storage"][1:] == pytest.approx([0.5, 0.6])
    assert out["temporal_recall_storage_mean"] == pytest.approx(0.55)
    # pooled over (k, probe) pairs: k=2 A1 C1 (1 right), k=3 A1 B1 C1 B2 C2 (3 right) -> 4/7
    assert out["temporal_recall_storage_pooled"] == pytest.approx(4 / 7)
    assert out["temporal_recall_storage_counts"] == [0, 2, 5] and out["temporal_recall_storage_n"] == 7
    assert out["temporal_recall_storage_final"] == pytest.approx(0.6)
    assert out["plasticity_storage_mean_f1"] == pytest.approx(0.875)
    assert out["plasticity_storage_pooled_f1"] == pytest.approx(0.875)
    assert out["stability_storage_mean_f1"] == pytest.approx(0.75)
    assert out["temporal_recall_storage_mean_f1"] == pytest.approx(0.775)
    assert out["temporal_recall_storage_pooled_f1"] == pytest.approx(0.5 * 4 / 7 + 0.5)
    assert out["temporal_recall_storage_final_f1"] == pytest.approx(0.8)

    # Extraction matrix: row 0 [0,0,0], row 1 [1,0,0], row 2 [1,1,0], row 3 [0,1,0]
    np.testing.assert_allclose(
        out["matrix_extraction_em"], [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]
    )
    # ACC = (0 + 1 + 0) / 3; BWT = ((0 - 1) + (1 - 1)) / 2; FWT = ((0 - 0) + (0 - 0)) / 2;
    # forgetting = ((max(1, 1) - 0) + (1 - 1)) / 2
    assert out["acc_extraction"] == pytest.approx(1 / 3)
    assert out["bwt_extraction"] == pytest.approx(-0.5)
    assert out["fwt_extraction"] == pytest.approx(0.0)
    assert out["forgetting_extraction"] == pytest.approx(0.5)
    assert out["plasticity_extraction"][:2] == [1.0, 1.0] and out["plasticity_extraction"][2] is None
    assert out["plasticity_extraction_pooled"] == 1.0 and out["plasticity_extraction_n"] == 2
    assert out["stability_extraction_pooled"] == 0.0 and out["stability_extraction_n"] == 1
    assert out["temporal_recall_extraction"][1:] == pytest.approx([1.0, 0.5])
    assert out["temporal_recall_extraction_mean"] == pytest.approx(0.75)
    assert out["temporal_recall_extraction_pooled"] == pytest.approx(2 / 3)  # P1@2, P1@3, P2@3 = 1, 0, 1
    assert out["temporal_recall_extraction_final"] == pytest.approx(0.5)

    assert out["num_probes"] == {
        "total": 15,
        "storage": {"new": 4, "changed": 4, "unchanged": 4, "total": 12},
        "extraction": {"new": 1, "changed": 1, "unchanged": 1, "total": 3},
    }


def _expected_keys() -> set[str]:
    keys = {"period_names", "num_probes"}
    for fam in ("storage", "extraction"):
        keys |= {f"matrix_{fam}_em", f"matrix_{fam}_f1"}
        keys |= {f"{m}_{fam}{s}" for m in ("acc", "bwt", "fwt", "forgetting", "forgetting_chaudhry") for s in ("", "_f1")}
        for name in ("plasticity", "stability", "temporal_recall"):
            keys |= {f"{name}_{fam}{s}" for s in ("", "_counts", "_mean", "_mean_f1", "_pooled", "_pooled_f1", "_n")}
        keys |= {f"temporal_recall_{fam}_final", f"temporal_recall_{fam}_final_f1"}
    return keys


EXPECTED_KEYS = _expected_keys()


def test_derive_metrics_keys_and_json_safe() -> None:
    out = derive_metrics(hand_rows_em(), hand_rows_f1(), hand_probes(), PERIODS)
    assert set(out) == EXPECTED_KEYS
    text = json.dumps(out, allow_nan=False)  # raises on any NaN/inf left in
    assert "NaN" not in text
    assert json.loads(text) == out


def test_derive_metrics_all_undefined_is_none_not_nan() -> None:
    # T = 1, no extraction probes, no unchanged probes: most metrics are undefined and must be None.
    probes = [make_probe("a1", "2020", "new", "2020", None)]
    rows = [{"a1": 0.0}, {"a1": 1.0}]
    out = derive_metrics(rows, rows, probes, ["2020"])
    text = json.dumps(out, allow_nan=False)
    assert "NaN" not in text
    for key in ("bwt_storage", "fwt_storage", "forgetting_storage", "bwt_storage_f1", "stability_storage_mean",
                "stability_storage_pooled", "temporal_recall_storage_mean", "temporal_recall_storage_final",
                "acc_extraction", "plasticity_extraction_pooled"):
        assert out[key] is None, key
    assert out["acc_storage"] == 1.0
    assert out["plasticity_storage"] == [1.0]
    assert out["stability_storage"] == [None]
    assert out["matrix_extraction_em"] == [[None], [None]]
    assert all(isinstance(v, float) for v in out["matrix_storage_em"][1])


def test_routing_accuracy() -> None:
    probes = hand_probes()[:4] + hand_probes()[4:6]  # A1 B1 C1 D1 (2020), A2 B2 (2021)
    routed = {"A1": "2020", "B1": "2020", "C1": "2021", "D1": "2020", "A2": "2021", "B2": "2020"}
    # correct: A1 B1 D1 A2 = 4 of 6
    assert routing_accuracy(routed, probes) == pytest.approx(4 / 6)
    assert routing_accuracy(None, probes) is None  # method does not route: None, never NaN
    assert routing_accuracy({}, []) is None
    with pytest.raises(ValueError, match="'B2'"):
        routing_accuracy({k: v for k, v in routed.items() if k != "B2"}, probes)


# --------------------------------------------------------------------------------------------
# DyKnow's answer kinds (Mousavi et al. 2024): correct, outdated (an earlier value), irrelevant; and
# "later" (a value taught after the period asked about). Two facts over three periods:
#   X: 2020 red, 2021 blue (changed), 2022 green (changed)
#   Y: 2020 one, 2021 one (unchanged), 2022 two (changed)
def _fact_probe(pid: str, period: str, kind: str, value: str, previous: str | None, until: str | None) -> Probe:
    return Probe(id=pid, subject=pid[0], relation="rel", value=value, period=period, valid_from=period,
                 valid_until=until, previous_value=previous, kind=kind,  # type: ignore[arg-type]
                 family="storage", prompt=f"In {period}, {pid[0]} was", template_id="t0")


def _fact_probes() -> list[Probe]:
    return [_fact_probe("X1", "2020", "new", "red", None, "2021"),
            _fact_probe("X2", "2021", "changed", "blue", "red", "2022"),
            _fact_probe("X3", "2022", "changed", "green", "blue", None),
            _fact_probe("Y1", "2020", "new", "one", None, "2022"),
            _fact_probe("Y2", "2021", "unchanged", "one", "one", "2022"),
            _fact_probe("Y3", "2022", "changed", "two", "one", None)]


#            X1        X2     X3      Y1     Y2     Y3
_PREDS = {0: ["", "", "", "", "", ""],
          1: ["Red.", "red", "", "one", "", ""],
          2: ["blue", "red", "", "one", "one", ""],
          3: ["green", "red", "Blue", "two", "one", "seven"]}


def test_answer_kinds_hand_computed() -> None:
    probes = _fact_probes()
    rows_pred = [dict(zip([p.id for p in probes], _PREDS[k])) for k in range(4)]
    out = answer_kind_rates(rows_pred, probes, PERIODS, "storage")
    nan = math.nan
    # after 2021, asked about 2021's changed fact X: "red" is 2020's value. After 2022: X3 "Blue" is
    # 2021's value (outdated), Y3 "seven" was never true (irrelevant).
    assert out["outdated_storage"] == pytest.approx([nan, 1.0, 0.5], nan_ok=True)
    assert out["outdated_storage_counts"] == [0, 1, 2]
    assert out["outdated_storage_mean"] == pytest.approx(0.75)
    assert out["outdated_storage_pooled"] == pytest.approx(2 / 3)
    assert out["outdated_storage_n"] == 3
    assert out["outdated_storage_answers"]["irrelevant"] == pytest.approx([nan, 0.0, 0.5], nan_ok=True)
    assert out["outdated_storage_answers"]["correct"] == pytest.approx([nan, 0.0, 0.0], nan_ok=True)
    # temporal recall's probes: after 2021, X1 (red until 2021) answered "blue" (later); after 2022, of X1,
    # X2, Y1, Y2: X1 "green" and Y1 "two" are later values, X2 "red" is outdated, Y2 "one" correct.
    assert out["overwritten_storage"] == pytest.approx([nan, 1.0, 0.5], nan_ok=True)
    assert out["overwritten_storage_counts"] == [0, 1, 4]
    assert out["overwritten_storage_pooled"] == pytest.approx(3 / 5)
    assert out["overwritten_storage_answers"]["outdated"] == pytest.approx([nan, 0.0, 0.25], nan_ok=True)
    assert out["overwritten_storage_answers"]["correct"] == pytest.approx([nan, 0.0, 0.25], nan_ok=True)
    # a family with no probe in either view: undefined (NaN), never a division by zero
    none = answer_kind_rates(rows_pred, probes, PERIODS, "extraction")
    assert math.isnan(none["outdated_extraction_pooled"]) and none["outdated_extraction_n"] == 0
    assert math.isnan(none["overwritten_extraction_pooled"])


def test_answer_kind_rules() -> None:
    probe = _fact_probe("Z2", "2021", "changed", "down", "up", "2022")
    history = {1: "up", 2: "down", 3: "up"}
    assert answer_kind("The Down.", probe, history, asked=2, newest=3) == "correct"
    # a value both before and after the period asked: the later teaching explains it
    assert answer_kind("up", probe, history, asked=2, newest=3) == "later"
    assert answer_kind("up", probe, history, asked=2, newest=2) == "outdated"
    # an empty answer never matches, not even a value that normalises to nothing
    assert answer_kind("", probe, {1: "the", 2: "down"}, asked=2, newest=2) == "irrelevant"
    assert answer_kind("sideways", probe, history, asked=2, newest=3) == "irrelevant"
    # a value the fact only takes in a period the model has not been taught yet is no knowledge of it
    assert answer_kind("left", probe, {1: "up", 2: "down", 3: "left"}, asked=2, newest=2) == "irrelevant"
    assert answer_kind("left", probe, {1: "up", 2: "down", 3: "left"}, asked=1, newest=2) == "irrelevant"


def test_derive_metrics_with_predictions_adds_the_answer_kinds() -> None:
    probes = hand_probes()
    rows_pred = [{p.id: "" for p in probes} for _ in range(4)]
    out = derive_metrics(hand_rows_em(), hand_rows_f1(), probes, PERIODS, rows_pred)
    added = {f"{view}_{fam}{s}" for view in ("outdated", "overwritten") for fam in ("storage", "extraction")
             for s in ("", "_mean", "_pooled", "_n", "_counts", "_answers")}
    assert set(out) == EXPECTED_KEYS | added
    json.dumps(out, allow_nan=False)
    one_missing = rows_pred[:3] + [{p.id: "" for p in probes[1:]}]
    with pytest.raises(ValueError, match=f"prediction row 3 has no answer for probe '{probes[0].id}'"):
        derive_metrics(hand_rows_em(), hand_rows_f1(), probes, PERIODS, one_missing)


def test_value_history_takes_each_probe_s_value_and_its_previous_one() -> None:
    z3 = _fact_probe("Z3", "2022", "changed", "green", "blue", None)  # Z has no probe in 2020 or 2021
    assert value_history([z3], PERIODS) == {("Z", "rel"): {3: "green", 2: "blue"}}
    # a probe's own value wins over the previous_value a later probe states for that period
    z2 = _fact_probe("Z2", "2021", "changed", "teal", "red", "2022")
    assert value_history([z3, z2], PERIODS) == {("Z", "rel"): {3: "green", 2: "teal", 1: "red"}}
    # the first period has none before it; a probe without a previous value adds nothing
    w1 = _fact_probe("W1", "2020", "new", "one", "zero", None)
    w2 = _fact_probe("W2", "2021", "unchanged", "one", None, None)
    assert value_history([w1, w2], PERIODS) == {("W", "rel"): {1: "one", 2: "one"}}


# Edges the tests above leave open (each kills a mutant scripts/mutation.py found; docs/mutation.md)


def test_each_bad_input_names_what_to_fix() -> None:
    probes = [make_probe("a1", "2020", "new", "2020", None)]
    with pytest.raises(ValueError, match="period_names is empty"):
        score_matrix([{"a1": 0.0}], probes, [])
    with pytest.raises(ValueError, match=r"period_names has duplicates: \['2020', '2020'\]"):
        score_matrix([{"a1": 0.0}] * 3, probes, ["2020", "2020"])
    with pytest.raises(ValueError, match=r"got 3 score rows for 3 periods: need T\+1 = 4 "):
        score_matrix([{"a1": 0.0}] * 3, probes, PERIODS)
    late = [make_probe("a1", "2020", "new", "2020", "2031")]
    with pytest.raises(ValueError, match=r"'a1' has valid_until '2031', not in \['2020', '2021', '2022'\]"):
        score_matrix([{"a1": 0.0}] * 4, late, PERIODS)


def test_a_matrix_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(AssertionError, match=r"R must be \(T\+1, T\), got \(3, 3\)"):
        average_accuracy(np.zeros((3, 3)))


def test_undefined_metrics_come_without_a_numpy_warning() -> None:
    # No extraction probe, no unchanged probe, T = 3: empty means, an all-NaN column under forgetting's max
    # and an empty pooled subset. Each is NaN (None in the JSON) by a check, not by numpy's warning path.
    probes = [make_probe(f"{c}1", name, "new", name, None) for c, name in zip("abc", PERIODS)]
    rows = [{p.id: float(HAND_R[k, t]) for t, p in enumerate(probes)} for k in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = derive_metrics(rows, rows, probes, PERIODS)
        assert forgetting(np.full((4, 3), np.nan)) != forgetting(np.full((4, 3), np.nan))  # NaN
    assert out["forgetting_extraction"] is None and out["stability_storage_pooled"] is None
    assert out["stability_storage_mean"] is None and out["acc_extraction"] is None


def test_json_safe_keeps_bools_ints_and_floats_apart() -> None:
    got = _json_safe({"b": np.bool_(True), "t": True, "i": np.int64(3), "f": np.float32(0.5),
                      "n": [np.nan, np.inf], 1: (np.array([1.0, 2.0]), "s")})
    assert got == {"b": True, "t": True, "i": 3, "f": 0.5, "n": [None, None], "1": [[1.0, 2.0], "s"]}
    assert type(got["b"]) is bool and type(got["i"]) is int and type(got["f"]) is float
