"""The registry's AdamW on parameters with `update_rows` when its row-restricted step does not apply
(amsgrad, maximize): it must fall back to the dense step with the other rows put back,
so the chosen rows move exactly as torch's AdamW with the same options moves them (tests/test_smf.py
checks the row-restricted path itself)."""

from __future__ import annotations

import pytest
import torch

from training.optimizers import UPDATE_ROWS, AdamW


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
