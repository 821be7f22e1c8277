"""Loss landscape: filter normalisation, the Fisher power iteration, grid metrics, and the job on a real run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from artifacts import verify_manifest
from eval_and_metrics import report
from scripts import landscape
from tests.fixtures.sweep import pristine_sweep, runs_by_method_seed  # noqa: F401


def test_filter_normalised_direction_matches_filter_norms() -> None:
    w = torch.randn(4, 6)
    w[2] = 0.0
    bias = torch.randn(4)
    gen = torch.Generator().manual_seed(0)
    d_w, d_b = landscape.filter_normalized_direction([w, bias], gen)
    assert torch.allclose(d_w.norm(dim=1), w.norm(dim=1), atol=1e-5)
    assert torch.all(d_w[2] == 0)  # a zero filter does not move (e.g. a fresh LoRA B)
    assert torch.all(d_b == 0)  # 1-D parameters are left out by default, as in Li et al.
    _, d_b = landscape.filter_normalized_direction([w, bias], gen, include_1d=True)
    assert float(d_b.norm()) == pytest.approx(float(bias.norm()), rel=1e-5)


def test_grid_metrics_on_a_known_quadratic() -> None:
    coords = np.linspace(-1, 1, 11)
    a, b = np.meshgrid(coords, coords, indexing="ij")
    grid = 2.0 + a**2 + 3 * b**2  # Hessian diag(2, 6): central differences are exact on quadratics
    m = landscape.grid_metrics(grid, coords, center_loss=2.0)
    assert m["max_curvature"] == pytest.approx(6.0)
    assert m["center_curvature"] == pytest.approx(6.0)
    assert m["loss_range"] == pytest.approx(4.0)
    assert m["max_loss"] == pytest.approx(6.0) and m["min_loss"] == pytest.approx(2.0)
    assert m["std_loss"] == pytest.approx(float(grid.std()))


def _tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg)


def test_fisher_power_iteration_matches_an_eigendecomposition() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 12, (6, 5), generator=torch.Generator().manual_seed(1))
    ex = landscape.Examples(ids, torch.ones_like(ids), torch.ones(6, 5))
    params = [p for p in model.parameters()]
    grads = landscape.per_example_grads(model, params, ex).double()
    gram = (grads @ grads.T / len(ex)).numpy()  # same non-zero spectrum as 1/N G^T G
    expected = float(np.linalg.eigvalsh(gram)[-1])
    lam, _ = landscape.fisher_top_eigenvalue(model, params, ex, iters=2000, tol=1e-10, seed=0)
    assert lam == pytest.approx(expected, rel=1e-3)


def test_loss_grid_restores_the_parameters() -> None:
    model = _tiny_lm()
    ids = torch.randint(0, 12, (3, 5), generator=torch.Generator().manual_seed(2))
    ex = landscape.Examples(ids, torch.ones_like(ids), torch.ones(3, 5))
    params = [p for p in model.parameters()]
    before = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    d1 = landscape.filter_normalized_direction(params, gen)
    d2 = landscape.filter_normalized_direction(params, gen)
    coords = np.linspace(-0.5, 0.5, 3)
    grid = landscape.loss_grid(model, params, d1, d2, coords, ex)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    assert grid[1, 1] == pytest.approx(landscape.mean_loss(model, ex), rel=1e-6)


def test_landscape_job_on_a_trained_lora_run(pristine_sweep: Path, tmp_path: Path) -> None:  # noqa: F811
    src = runs_by_method_seed(pristine_sweep)[("lora", 0)]
    run = tmp_path / "runs" / src.name
    shutil.copytree(src, run)
    rc = landscape.main([str(run), "--grid", "5", "--max-examples", "8", "--fisher-examples", "4",
                         "--power-iters", "10", "--threads", "1"])
    assert rc == 0
    results = {}
    for period in sorted((run / "periods").iterdir()):
        k = int(period.name.split("-")[0])
        assert verify_manifest(period / "landscape") == (True, "ok")
        assert verify_manifest(period) == (True, "ok")  # the extra subdir does not break the period
        assert (period / "landscape" / "contour.png").stat().st_size > 1000
        assert (period / "landscape" / "surface.png").stat().st_size > 1000
        results[k] = json.loads((period / "landscape" / "landscape.json").read_text())
    assert sorted(results) == [0, 1, 2, 3, 4]
    # LoRA's B starts at zero, so a filter-normalised slice of the base model is exactly flat.
    assert results[0]["metrics"]["loss_range"] == pytest.approx(0.0, abs=1e-6)
    assert results[1]["metrics"]["forgetting_estimate"] is None
    for k in (2, 3, 4):
        m, f = results[k]["metrics"], results[k]["forgetting"]
        assert f["lambda_prev"] == results[k - 1]["metrics"]["fisher_top_eigenvalue"]
        new = load_file(str(run / "periods" / f"{k}-{results[k]['period_name']}" / "trainable.safetensors"))
        old = load_file(str(run / "periods" / f"{k - 1}-{results[k - 1]['period_name']}" / "trainable.safetensors"))
        delta = math.sqrt(sum(float(((new[n] - old[n]) ** 2).sum()) for n in new))
        assert m["delta_w_norm"] == pytest.approx(delta, rel=1e-5)
        assert m["forgetting_estimate"] == pytest.approx(0.5 * f["lambda_prev"] * delta**2, rel=1e-5)

    out = tmp_path / "report"
    assert report.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert "Loss landscape per period checkpoint" in (out / "summary.md").read_text()
    assert list((out / "plots").glob("*-landscape.png"))
    assert (out / "report.html").read_text().count("data:image/png;base64") >= 6 + 5  # plots + contours


def test_load_period_model_refuses_a_damaged_period(pristine_sweep: Path, tmp_path: Path) -> None:  # noqa: F811
    src = runs_by_method_seed(pristine_sweep)[("full_ft", 0)]
    run = tmp_path / src.name
    shutil.copytree(src, run)
    target = run / "periods" / "1-2018" / "trainable.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a committed period: sha256 mismatch"):
        landscape.load_period_model(run, 1, device="cpu")
    with pytest.raises(ValueError, match="out of range"):
        landscape.load_period_model(run, 9, device="cpu")
    with pytest.raises(ValueError, match="unknown; valid: base, 2018"):
        landscape.load_period_model(run, "final", device="cpu")
