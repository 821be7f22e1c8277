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
from tests.conftest import tiny_stream_runs
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


# ------------------------------------------------------------------------------------------
# a task stream: the run's data is data/stream.json, its periods are tasks


@pytest.fixture(scope="module")
def stream_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_stream_runs(tmp_path_factory.mktemp("landscape-stream"), "lora")["lora"]


def test_stream_examples_are_the_task_items_under_their_own_loss(stream_run: Path) -> None:
    pm = landscape.load_period_model(stream_run, "mcb", device="cpu")
    stream = pm.bench.stream
    tok = pm.tokenizer
    # eval (= probes): each eval item's gold target given its prompt; only the target's tokens count
    ex = landscape.build_examples(pm, "eval", "mca", 64, 0)
    task = stream.tasks[0]
    assert len(ex) == len(task.eval)
    assert ex.target_mask.sum(1).tolist() == [float(len(tok(x.target, add_special_tokens=False)["input_ids"]))
                                              for x in task.eval]
    assert torch.equal(landscape.build_examples(pm, "probes", "mca", 64, 0).ids, ex.ids)
    # train (= passages): the task's training items, the completion (and EOS) under the loss as in training
    ex = landscape.build_examples(pm, "train", "mcb", 64, 0)
    task = stream.tasks[1]
    assert len(ex) == len(task.train)
    assert ex.target_mask.sum(1).tolist() == [float(len(tok(x.completion, add_special_tokens=False)["input_ids"]) + 1)
                                              for x in task.train]
    assert landscape.build_examples(pm, "train", "mcb", 3, 0).ids.shape[0] == 3
    with pytest.raises(ValueError, match="'2018' is not a task of this run; valid: mca, mcb"):
        landscape.build_examples(pm, "eval", "2018", 64, 0)


def test_landscape_job_on_a_stream_run(stream_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / stream_run.name
    shutil.copytree(stream_run, run)
    fast = ["--grid", "3", "--max-examples", "4", "--fisher-examples", "2", "--power-iters", "3", "--threads", "1"]
    assert landscape.main([str(run), *fast]) == 0
    results = {p.name: json.loads((p / "landscape" / "landscape.json").read_text())
               for p in sorted((run / "periods").iterdir())}
    assert sorted(results) == ["0-base", "1-mca", "2-mcb"]
    assert [r["settings"]["data_period"] for r in results.values()] == ["mca", "mca", "mcb"]
    assert results["2-mcb"]["forgetting"]["from_period"] == "mca"
    assert results["2-mcb"]["metrics"]["forgetting_estimate"] is not None
    # another task's training items, one period
    assert landscape.main([str(run), *fast, "--period", "mcb", "--data", "train", "--data-period", "mca"]) == 0
    again = json.loads((run / "periods" / "2-mcb" / "landscape" / "landscape.json").read_text())
    assert (again["settings"]["data"], again["settings"]["data_period"], again["num_examples"]) == ("train", "mca", 4)
    assert verify_manifest(run / "periods" / "2-mcb" / "landscape") == (True, "ok")
    capsys.readouterr()
    assert landscape.main([str(run), *fast, "--data-period", "2018"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == ["error: --data-period '2018' is not a task of this run; valid: mca, mcb"]


def test_lm_eval_job_reads_a_stream_run(stream_run: Path) -> None:
    from scripts import lm_eval_job

    # the same reader as landscape and export: the committed prefix of a run whose data is stream.json
    assert lm_eval_job.committed_prefix(stream_run) == [0, 1, 2]
