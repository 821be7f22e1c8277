"""CASMO's edges beside the formulas of tests/test_casmo.py: which options it refuses (and the boundaries it
accepts), the calibration rule's branches and clamps, that its checkpoint entry is a copy both ways, and its
step with nothing to update. The mutation run of training/optimizers/casmo.py (docs/mutation.md) found them
untested."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from training.optimizers.casmo import (
    AGAR_EPS,
    C_MIN_BY_CV,
    CASMO,
    SIGMA_FLOOR,
    TAU_RANGE,
    calibrate,
    group_confidence,
)


def _p() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(("options", "message"), [
    ({"granularity": "row"}, "granularity must be 'group' or 'element' (got 'row')"),
    ({"calibrating_confidence": "half"}, "calibrating_confidence must be 'one' or 'agar' (got 'half')"),
    ({"calibration_steps": 1}, "calibration_steps must be >= 2 for a spread (got 1)"),
    ({"c_min": -0.01}, "need 0 <= c_min, rel_floor <= 1 and robustness >= 0 (got -0.01, 0.1, 0.5)"),
    ({"c_min": 1.01}, "need 0 <= c_min, rel_floor <= 1 and robustness >= 0 (got 1.01, 0.1, 0.5)"),
    ({"rel_floor": -0.5}, "need 0 <= c_min, rel_floor <= 1 and robustness >= 0 (got 0.1, -0.5, 0.5)"),
    ({"rel_floor": 1.5}, "need 0 <= c_min, rel_floor <= 1 and robustness >= 0 (got 0.1, 1.5, 0.5)"),
    ({"robustness": -1e-9}, "need 0 <= c_min, rel_floor <= 1 and robustness >= 0 (got 0.1, 0.1, -1e-09)"),
])
def test_a_bad_option_is_refused_naming_it(options: dict, message: str) -> None:
    with pytest.raises(ValueError) as info:
        CASMO(_p(), **options)
    assert str(info.value) == message


def test_the_boundaries_of_every_option_are_accepted_and_kept() -> None:
    for options in ({"calibration_steps": 2}, {"c_min": 0.0, "rel_floor": 0.0, "robustness": 0.0},
                    {"c_min": 1.0, "rel_floor": 1.0}):
        CASMO(_p(), **options)
    opt = CASMO(_p(), lr=0.5, betas=[0.8, 0.9], eps=1e-6, weight_decay=0.2, calibration_steps=7,
                granularity="element", c_min=0.25, robustness=2.0, rel_floor=0.3, calibrating_confidence="agar")
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.5, (0.8, 0.9), 1e-6, 0.2)
    assert (opt.calibration_steps, opt.granularity, opt.c_min, opt.robustness, opt.rel_floor,
            opt.calibrating_confidence) == (7, "element", 0.25, 2.0, 0.3, "agar")
    defaults = CASMO(_p())
    assert (defaults.calibration_steps, defaults.granularity, defaults.c_min, defaults.robustness,
            defaults.rel_floor, defaults.calibrating_confidence) == (20, "group", 0.1, 0.5, 0.1, "one")
    g = defaults.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0)
    assert defaults.casmo == {"num_steps": 0, "agar_samples": [], "calibrated": False, "tau": 0.0, "sigma": 0.0,
                              "c_min": 0.0, "last_agar": 0.0, "last_confidence": 1.0, "last_calibrating": 1}
    assert defaults.stats() == {"casmo_confidence": 1.0, "casmo_agar": 0.0, "casmo_calibrating": 1.0}
    assert all(type(v) is float for v in defaults.stats().values())  # JSON numbers in the step log


def test_the_horizon_problem_says_what_happens_and_what_to_do() -> None:
    opt = CASMO(_p(), calibration_steps=12)
    assert opt.horizon_problem(13) is None
    assert opt.horizon_problem(12) == ("train.casmo.calibration_steps=12 >= the 12 optimizer steps of this period: "
                                       "it never leaves calibration and trains as plain AdamW (lower the window)")
    assert opt.horizon_problem(3).startswith("train.casmo.calibration_steps=12 >= the 3 optimizer steps")


def test_calibration_picks_c_min_from_the_spread_and_clamps_tau_and_sigma() -> None:
    # cv = pstdev / mean: > 0.5 -> 0.1, > 0.3 -> 0.3, else 0.5; the original's constants
    assert (SIGMA_FLOOR, TAU_RANGE, C_MIN_BY_CV) == (0.01, (0.01, 0.5), (0.1, 0.3, 0.5))
    wide, medium, narrow = [0.1, 0.9], [0.3, 0.7], [0.45, 0.55]  # cv 0.8, 0.4, 0.1
    assert calibrate(wide)["c_min"] == 0.1
    assert calibrate(medium)["c_min"] == 0.3
    assert calibrate(narrow)["c_min"] == 0.5
    assert calibrate([0.2, 0.2, 0.2]) == {"tau": 0.2, "sigma": 0.01, "c_min": 0.5}  # no spread: the floor
    assert calibrate([0.9, 0.95, 1.0])["tau"] == 0.5  # the median clipped from above
    assert calibrate([0.001, 0.002, 0.003])["tau"] == 0.01  # and from below
    got = calibrate([0.0, 0.1, 0.2, 0.4])
    assert got["tau"] == pytest.approx(0.15) and got["sigma"] == pytest.approx(statistics.pstdev([0, .1, .2, .4]))
    # every sample zero (a parameter that never had a gradient): no division by zero, the narrow branch
    assert calibrate([0.0, 0.0]) == {"tau": 0.01, "sigma": 0.01, "c_min": 0.5}


def test_calibration_thresholds_are_strict() -> None:
    # cv exactly at a threshold takes the higher c_min (the original's `cv > 0.5`, `cv > 0.3`); the samples
    # were found by stepping d one ulp at a time until cv = pstdev / (mean + 1e-8) lands on the threshold
    for samples, threshold, at, above in (([0.49999999500000003, 1.500000005], 0.5, 0.3, 0.1),
                                          ([0.174999997, 0.325000003], 0.3, 0.5, 0.3)):
        assert statistics.pstdev(samples) / (statistics.fmean(samples) + 1e-8) == threshold
        assert calibrate(samples)["c_min"] == at
        mean = statistics.fmean(samples)
        assert calibrate([mean - 1.01 * (mean - samples[0]), mean + 1.01 * (mean - samples[0])])["c_min"] == above


def test_group_confidence_is_the_shifted_sigmoid_between_c_min_and_one() -> None:
    assert group_confidence(0.3, 0.3, 0.05, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)  # at tau: halfway
    want = 0.1 + 0.9 / (1 + math.exp(-(0.4 - 0.3) / 0.05))
    assert group_confidence(0.4, 0.3, 0.05, 0.1) == pytest.approx(want, rel=1e-12)
    assert group_confidence(0.2, 0.3, 0.05, 0.1) == pytest.approx(0.1 + 0.9 / (1 + math.exp(2.0)), rel=1e-12)
    assert group_confidence(0.3, 0.3, 0.05, 1.0) == 1.0
    assert group_confidence(0.0, 0.5, 0.01, 0.25) == 0.25  # the farthest below tau: c_min


def test_the_checkpoint_entry_is_a_copy_both_ways() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = CASMO([p], calibration_steps=5)
    for g in (1.0, -0.5):
        p.grad = torch.tensor([g, g])
        opt.step()
    saved = opt.state_dict()
    assert saved["casmo"]["agar_samples"] == opt.casmo["agar_samples"] and len(saved["casmo"]["agar_samples"]) == 2
    p.grad = torch.tensor([2.0, 2.0])
    opt.step()  # appends a third sample to the live list
    assert len(saved["casmo"]["agar_samples"]) == 2 and saved["casmo"]["num_steps"] == 2

    other = CASMO([torch.nn.Parameter(torch.zeros(2))], calibration_steps=5)
    other.load_state_dict(saved)
    assert "casmo" in saved  # the caller's dict is not emptied by the load
    assert other.casmo == saved["casmo"] and other.casmo["agar_samples"] is not saved["casmo"]["agar_samples"]
    other.casmo["agar_samples"].append(0.5)
    assert len(saved["casmo"]["agar_samples"]) == 2
    assert other.state_dict()["state"][0]["step"] == saved["state"][0]["step"]


def test_a_step_with_no_gradient_changes_nothing_and_returns_the_closures_loss() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = CASMO([p], calibration_steps=2)
    calls = []

    def closure() -> float:
        calls.append(torch.is_grad_enabled())
        return 1.5

    assert opt.step(closure) == 1.5 and calls == [True]  # the closure runs with gradients on
    assert opt.step() is None
    assert opt.casmo["num_steps"] == 0 and opt.state_dict()["state"] == {} and torch.equal(p, torch.ones(2))


def test_sparse_gradients_are_refused() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(NotImplementedError, match="CASMO does not support sparse gradients"):
        CASMO([p]).step()


def test_the_agar_guard_only_matters_at_zero() -> None:
    # 1e-20: tiny next to any squared gradient float32 holds, so a gradient of 1e-6 still reads AGAR 1
    assert AGAR_EPS == 1e-20
    p = torch.nn.Parameter(torch.zeros(1))
    opt = CASMO([p], calibration_steps=10)
    p.grad = torch.tensor([1e-6])
    opt.step()
    assert opt.stats()["casmo_agar"] == pytest.approx(1.0, rel=1e-6)


def test_the_element_gate_of_equal_ratios_is_trust_to_the_robustness() -> None:
    opt = CASMO(_p(), granularity="element", c_min=0.2, robustness=2.0, rel_floor=0.5)
    gate = opt._element_gate(torch.tensor([0.5, 0.5, 0.5]))
    assert torch.allclose(gate, torch.full((3,), (0.2 + 0.8 * 0.5) ** 2))
    gate = opt._element_gate(torch.tensor([0.8, 0.2, 0.0]))  # mean 1/3
    trust = (0.2 + 0.8 / 3) ** 2
    assert torch.allclose(gate, torch.tensor([trust, trust * 0.6, trust * 0.5]))  # capped at 1, floored at 0.5
    zero = opt._element_gate(torch.zeros(2))  # no signal anywhere: finite, the floor of c_min's trust
    assert torch.allclose(zero, torch.full((2,), 0.2 ** 2 * 0.5))


def test_loading_another_optimizers_state_says_what_it_is() -> None:
    with pytest.raises(ValueError) as info:
        CASMO(_p()).load_state_dict(torch.optim.AdamW(_p()).state_dict())
    assert str(info.value) == "not a CASMO optimizer state (no 'casmo' entry); was it saved by another optimizer?"
