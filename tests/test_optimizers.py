"""The registry's AdamW on parameters with `update_rows` when its row-restricted step does not apply
(amsgrad, maximize): it must fall back to the dense step with the other rows put back,
so the chosen rows move exactly as torch's AdamW with the same options moves them (tests/test_smf.py
checks the row-restricted path itself)."""

from __future__ import annotations

import pytest
import torch

from training.optimizer_options import CasmoOptions
from training.optimizers import OPTIMIZERS, SGD_RULE, UPDATE_ROWS, AdamW


@pytest.mark.parametrize("options", [{"amsgrad": True}, {"maximize": True}])
def test_options_the_row_step_does_not_implement_take_the_dense_step_on_the_rows(options):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 4))
    ref = torch.nn.Parameter(p.detach().clone())
    opt = AdamW([p], lr=1e-2, weight_decay=0.01, **options)
    ref_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.01, **options)
    for i in range(4):
        rows = torch.randperm(16)[:5]
        grad = torch.zeros(16, 4)
        grad[rows] = torch.randn(5, 4) * (1 + i)  # growing gradients: amsgrad's max differs from Adam's
        p.grad, ref.grad = grad.clone(), grad.clone()
        setattr(p, UPDATE_ROWS, rows)
        before = p.detach().clone()
        opt.step()
        ref_before = ref.detach().clone()
        ref_opt.step()
        with torch.no_grad():
            others = torch.ones(16, dtype=torch.bool)
            others[rows] = False
            ref[others] = ref_before[others]
        assert torch.equal(p, ref), f"step {i}"
        assert not torch.equal(p[rows], before[rows]) and torch.equal(p[others], before[others])


def test_the_row_step_decays_like_torch_at_a_weight_decay_of_one():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 2))
    ref = torch.nn.Parameter(p.detach().clone())
    rows = torch.tensor([1, 5])
    grad = torch.zeros(8, 2)
    grad[rows] = torch.randn(2, 2)
    p.grad, ref.grad = grad.clone(), grad.clone()
    setattr(p, UPDATE_ROWS, rows)
    AdamW([p], lr=0.1, weight_decay=1.0).step()
    torch.optim.AdamW([ref], lr=0.1, weight_decay=1.0).step()
    assert torch.equal(p[rows], ref[rows])


def test_sgd_groups_after_another_group_step_and_the_closure_is_called():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = AdamW([{"params": [a]}, {"params": [b], "rule": SGD_RULE, "lr": 0.5}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.full((3,), 2.0)
    assert opt.step(lambda: 7.0) == 7.0
    assert torch.equal(b.detach(), torch.zeros(3))  # 1 - 0.5 * 2, the group second in the list


class _Train:
    lr, betas, weight_decay = 3e-3, (0.8, 0.95), 0.05
    casmo = CasmoOptions(calibration_steps=7, granularity="element", c_min=0.2)


def test_the_factories_pass_every_setting_of_the_train_section():
    p = torch.nn.Parameter(torch.ones(2))
    for name in OPTIMIZERS:
        d = OPTIMIZERS[name]([{"params": [p]}], _Train()).defaults
        assert (d["lr"], d["betas"], d["weight_decay"]) == (3e-3, (0.8, 0.95), 0.05), name
    opt = OPTIMIZERS["casmo"]([{"params": [p]}], _Train())
    assert (opt.calibration_steps, opt.granularity, opt.c_min) == (7, "element", 0.2)


def test_update_rows_holds_for_every_parameter_of_a_group_whatever_comes_before_it():
    # a parameter without update_rows, and one with update_rows but no gradient, before the restricted one
    plain, idle, p = (torch.nn.Parameter(torch.ones(4, 2)) for _ in range(3))
    opt = AdamW([plain, idle, p], lr=0.1, weight_decay=0.5)
    plain.grad, p.grad = torch.ones(4, 2), torch.ones(4, 2)
    setattr(idle, UPDATE_ROWS, torch.tensor([0]))
    setattr(p, UPDATE_ROWS, torch.tensor([2]))
    opt.step()
    assert torch.equal(p[[0, 1, 3]].detach(), torch.ones(3, 2)) and not torch.equal(p[2].detach(), torch.ones(2))
    assert getattr(idle, UPDATE_ROWS) is None and not torch.equal(plain.detach(), torch.ones(4, 2))
