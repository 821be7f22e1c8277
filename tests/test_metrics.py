"""Continual-learning metrics against hand-computed values (formulas in docs/metrics.md)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from data.schema import Probe
from eval_and_metrics.metrics import (
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
    paraphrase: bool = False,
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
        paraphrase=paraphrase,
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
    assert out["acc"] == pytest.approx(2.2 / 3)
    assert out["bwt"] == pytest.approx(-0.25)
    assert out["fwt"] == pytest.approx(0.25)
    assert out["forgetting"] == pytest.approx(0.30)
    assert out["forgetting_f1"] == pytest.approx(0.30)
    np.testing.assert_allclose(np.array(out["matrix_em"], dtype=float), HAND_R)


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
#   paraphrases: P1 of A1 (2020), P2 of C2 (2021), P3 of D3 (2022)
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
        make_probe("P1", "2020", "new", "2020", "2021", paraphrase=True),
        make_probe("P2", "2021", "changed", "2021", "2022", paraphrase=True),
        make_probe("P3", "2022", "unchanged", "2020", None, paraphrase=True),
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
    #      (A2, D1, D2 are still true; P1, P2 are paraphrases and reported apart)
    got = temporal_recall(hand_rows_em(), hand_probes(), PERIODS)
    assert math.isnan(got[0])
    assert got[1:] == pytest.approx([0.5, 0.6])


def test_derive_metrics_hand_computed() -> None:
    out = derive_metrics(hand_rows_em(), hand_rows_f1(), hand_probes(), PERIODS)

    # Standard-probe matrix (4 probes per period):
    #   row 0: [1/4, 1/4, 1/4]   row 1: [3/4, 2/4, 1/4]
    #   row 2: [3/4, 3/4, 1/4]   row 3: [3/4, 3/4, 2/4]
    np.testing.assert_allclose(
        out["matrix_em"],
        [[0.25, 0.25, 0.25], [0.75, 0.5, 0.25], [0.75, 0.75, 0.25], [0.75, 0.75, 0.5]],
    )
    # ACC = (0.75 + 0.75 + 0.5) / 3 = 2/3
    # BWT = ((0.75 - 0.75) + (0.75 - 0.75)) / 2 = 0
    # FWT = ((0.5 - 0.25) + (0.25 - 0.25)) / 2 = 0.125
    # forgetting = ((max(0.75, 0.75) - 0.75) + (0.75 - 0.75)) / 2 = 0
    assert out["acc"] == pytest.approx(2 / 3)
    assert out["bwt"] == pytest.approx(0.0)
    assert out["fwt"] == pytest.approx(0.125)
    assert out["forgetting"] == pytest.approx(0.0)
    # F1 = 0.5 * EM + 0.5: ACC -> 5/6, differences halve.
    assert out["acc_f1"] == pytest.approx(5 / 6)
    assert out["bwt_f1"] == pytest.approx(0.0)
    assert out["fwt_f1"] == pytest.approx(0.0625)
    assert out["forgetting_f1"] == pytest.approx(0.0)
    assert out["matrix_f1"][0] == pytest.approx([0.625, 0.625, 0.625])

    assert out["plasticity"] == pytest.approx([0.75, 1.0, 0.5])
    assert out["plasticity_mean"] == pytest.approx(0.75)
    assert out["stability"][0] is None
    assert out["stability"][1:] == pytest.approx([0.5, 0.5])
    assert out["stability_mean"] == pytest.approx(0.5)
    assert out["temporal_recall"][0] is None
    assert out["temporal_recall"][1:] == pytest.approx([0.5, 0.6])
    assert out["temporal_recall_mean"] == pytest.approx(0.55)
    assert out["temporal_recall_final"] == pytest.approx(0.6)
    assert out["plasticity_mean_f1"] == pytest.approx(0.875)
    assert out["stability_mean_f1"] == pytest.approx(0.75)
    assert out["temporal_recall_mean_f1"] == pytest.approx(0.775)
    assert out["temporal_recall_final_f1"] == pytest.approx(0.8)

    # Paraphrase matrix: row 0 [0,0,0], row 1 [1,0,0], row 2 [1,1,0], row 3 [0,1,0]
    np.testing.assert_allclose(
        out["matrix_paraphrase_em"], [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]
    )
    # final: P1 P2 P3 in row 3 = 0,1,0 -> 1/3; diagonal: P1@1, P2@2, P3@3 = 1,1,0 -> 2/3
    assert out["paraphrase_em_final"] == pytest.approx(1 / 3)
    assert out["paraphrase_em_diag"] == pytest.approx(2 / 3)

    assert out["num_probes"] == {
        "total": 15,
        "standard": {"new": 4, "changed": 4, "unchanged": 4, "total": 12},
        "paraphrase": {"new": 1, "changed": 1, "unchanged": 1, "total": 3},
    }


EXPECTED_KEYS = {
    "period_names",
    "matrix_em",
    "matrix_f1",
    "matrix_paraphrase_em",
    "acc",
    "bwt",
    "fwt",
    "forgetting",
    "acc_f1",
    "bwt_f1",
    "fwt_f1",
    "forgetting_f1",
    "plasticity",
    "plasticity_mean",
    "plasticity_mean_f1",
    "stability",
    "stability_mean",
    "stability_mean_f1",
    "temporal_recall",
    "temporal_recall_mean",
    "temporal_recall_mean_f1",
    "temporal_recall_final",
    "temporal_recall_final_f1",
    "paraphrase_em_final",
    "paraphrase_em_diag",
    "num_probes",
}


def test_derive_metrics_keys_and_json_safe() -> None:
    out = derive_metrics(hand_rows_em(), hand_rows_f1(), hand_probes(), PERIODS)
    assert set(out) == EXPECTED_KEYS
    text = json.dumps(out, allow_nan=False)  # raises on any NaN/inf left in
    assert "NaN" not in text
    assert json.loads(text) == out


def test_derive_metrics_all_undefined_is_none_not_nan() -> None:
    # T = 1, no paraphrases, no unchanged probes: most metrics are undefined and must be None.
    probes = [make_probe("a1", "2020", "new", "2020", None)]
    rows = [{"a1": 0.0}, {"a1": 1.0}]
    out = derive_metrics(rows, rows, probes, ["2020"])
    text = json.dumps(out, allow_nan=False)
    assert "NaN" not in text
    for key in ("bwt", "fwt", "forgetting", "bwt_f1", "stability_mean", "temporal_recall_mean",
                "temporal_recall_final", "paraphrase_em_final", "paraphrase_em_diag"):
        assert out[key] is None, key
    assert out["acc"] == 1.0
    assert out["plasticity"] == [1.0]
    assert out["stability"] == [None]
    assert out["matrix_paraphrase_em"] == [[None], [None]]
    assert all(isinstance(v, float) for v in out["matrix_em"][1])


def test_routing_accuracy() -> None:
    probes = hand_probes()[:4] + hand_probes()[4:6]  # A1 B1 C1 D1 (2020), A2 B2 (2021)
    routed = {"A1": "2020", "B1": "2020", "C1": "2021", "D1": "2020", "A2": "2021", "B2": "2020"}
    # correct: A1 B1 D1 A2 = 4 of 6
    assert routing_accuracy(routed, probes) == pytest.approx(4 / 6)
    assert routing_accuracy(None, probes) is None  # method does not route: None, never NaN
    assert routing_accuracy({}, []) is None
    with pytest.raises(ValueError, match="'B2'"):
        routing_accuracy({k: v for k, v in routed.items() if k != "B2"}, probes)
