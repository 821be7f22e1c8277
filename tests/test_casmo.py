"""CASMO (training/optimizers/casmo.py): the formulas against hand computations, AdamW equivalence while
calibrating, exact state round-trips, the config section, and a kill-and-resume run mid-calibration."""

from __future__ import annotations

import json
import math
import statistics
import typing
from pathlib import Path

import pytest
import torch

from tests.conftest import comparable, only_run_dir, read_results, train_records, signal_after_steps
from training import cli
from training.config import RunConfig, TrainConfig
from training.optimizers import OPTIMIZERS, horizon_problem, optimizer_stats
from training.optimizers.casmo import CASMO, calibrate, group_confidence

BETAS = (0.9, 0.999)


def _toy(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    return model, torch.randn(32, 6), torch.randn(32, 3)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
           steps: range) -> list[dict[str, float]]:
    """Deterministic full-batch-of-4 steps; the batch depends only on the step index."""
    out = []
    for k in steps:
        i = (4 * k) % len(x)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(x[i:i + 4]), y[i:i + 4]).backward()
        opt.step()
        out.append(optimizer_stats(opt))
    return out


def _scalar_steps(grads: list[float], **kw) -> tuple[torch.nn.Parameter, CASMO, list[dict[str, float]]]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = CASMO([p], lr=0.1, betas=BETAS, **kw)
    stats = []
    for g in grads:
        p.grad = torch.tensor([g])
        opt.step()
        stats.append(opt.stats())
    return p, opt, stats


def _hand_agar(grads: list[float]) -> list[float]:
    """Bias-corrected Adam moments of a scalar gradient sequence, and m^2 / max(v, m^2), in float64."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        mh, vh = m / (1 - 0.9 ** t), v / (1 - 0.999 ** t)
        out.append(mh * mh / max(vh, mh * mh))
    return out


# -- formulas ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["group", "element"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_torch_adamw_while_calibrating(granularity: str, weight_decay: float):
    model_a, x, y = _toy()
    model_b, _, _ = _toy()
    adamw = torch.optim.AdamW(model_a.parameters(), lr=3e-3, betas=BETAS, weight_decay=weight_decay)
    casmo = CASMO(model_b.parameters(), lr=3e-3, betas=BETAS, weight_decay=weight_decay,
                  calibration_steps=10**6, granularity=granularity)
    _train(model_a, adamw, x, y, range(40))
    stats = _train(model_b, casmo, x, y, range(40))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(adamw.state.values(), casmo.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert all(s["casmo_confidence"] == 1.0 and s["casmo_calibrating"] == 1.0 for s in stats)
    assert all(0.0 <= s["casmo_agar"] <= 1.0 for s in stats)


def test_confidence_during_and_after_calibration_matches_hand_computation():
    grads = [1.0, 0.5, -1.0, 2.0, 1.0, -0.5, 0.25]
    agar = _hand_agar(grads)
    assert agar[0] == pytest.approx(1.0)  # one gradient: m^2 = v, all signal
    _, _, stats = _scalar_steps(grads, calibration_steps=3)
    for t, s in enumerate(stats):
        assert s["casmo_agar"] == pytest.approx(agar[t], rel=1e-5)
    assert [s["casmo_calibrating"] for s in stats] == [1, 1, 1, 0, 0, 0, 0]
    assert [s["casmo_confidence"] for s in stats[:3]] == [1.0, 1.0, 1.0]

    # The calibration rule, by hand from the three samples.
    samples = agar[:3]
    mu, spread, median = sum(samples) / 3, statistics.pstdev(samples), sorted(samples)[1]
    cv = spread / mu
    c_min = 0.1 if cv > 0.5 else 0.3 if cv > 0.3 else 0.5
    tau, sigma = min(max(median, 0.01), 0.5), max(spread, 0.01)
    for t in range(3, len(grads)):
        want = c_min + (1 - c_min) / (1 + math.exp(-(agar[t] - tau) / sigma))
        assert stats[t]["casmo_confidence"] == pytest.approx(want, rel=1e-5)
    assert calibrate(samples) == pytest.approx({"tau": tau, "sigma": sigma, "c_min": c_min})


def test_after_calibration_the_step_is_adamw_times_confidence():
    grads = [1.0, 0.5, -1.0, 2.0, 1.0]
    p, opt, stats = _scalar_steps(grads[:-1], calibration_steps=3)
    q = torch.nn.Parameter(torch.zeros(1))
    ref = torch.optim.AdamW([q], lr=0.1, betas=BETAS, weight_decay=0.0)
    for g in grads[:-1]:
        q.grad = torch.tensor([g])
        ref.step()
    before_p, before_q = p.detach().clone(), q.detach().clone()
    p.grad, q.grad = torch.tensor([grads[-1]]), torch.tensor([grads[-1]])
    opt.step()
    ref.step()
    conf = opt.stats()["casmo_confidence"]
    assert 0.1 <= conf < 1.0
    assert float(p.detach() - before_p) == pytest.approx(conf * float(q.detach() - before_q), rel=1e-5)


def test_agar_of_a_constant_gradient_is_one_and_of_an_alternating_one_goes_to_zero():
    g = torch.randn(50)
    p = torch.nn.Parameter(torch.zeros(50))
    opt = CASMO([p], lr=1e-3, calibration_steps=10**6)
    for _ in range(30):
        p.grad = g.clone()
        opt.step()
    assert opt.stats()["casmo_agar"] == pytest.approx(1.0, abs=1e-6)

    p = torch.nn.Parameter(torch.zeros(50))
    opt = CASMO([p], lr=1e-3, calibration_steps=10**6)
    trace = []
    for t in range(300):
        p.grad = g * (1 if t % 2 == 0 else -1)
        opt.step()
        trace.append(opt.stats()["casmo_agar"])
    assert trace[0] == pytest.approx(1.0, abs=1e-6)  # one sample cannot tell signal from noise
    assert trace[20] < 0.01
    # The EMA of +g, -g, ... settles at +-g (1 - b1) / (1 + b1): AGAR -> ((1 - b1) / (1 + b1))^2.
    assert trace[-1] == pytest.approx(((1 - 0.9) / (1 + 0.9)) ** 2, rel=2e-2)


def test_zero_gradient_reads_zero_not_nan():
    p = torch.nn.Parameter(torch.ones(4))
    opt = CASMO([p], lr=1e-3, calibration_steps=2)
    for _ in range(4):
        p.grad = torch.zeros(4)
        opt.step()
    s = opt.stats()
    assert s["casmo_agar"] == 0.0 and math.isfinite(s["casmo_confidence"])
    assert torch.equal(p, torch.ones(4))  # m = 0: no step, whatever the confidence


def test_element_granularity_gates_each_coordinate():
    # Coordinate 0 sees a constant gradient (AGAR ~ 1), coordinate 1 an alternating one (AGAR ~ a).
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    opt = CASMO([p], lr=0.01, calibration_steps=2, granularity="element", c_min=0.1, robustness=0.5,
                rel_floor=0.1)
    ref = torch.optim.AdamW([q], lr=0.01, weight_decay=0.0)
    for t in range(12):
        grad = torch.tensor([1.0, 1.0 if t % 2 == 0 else -1.0])
        before_p, before_q = p.detach().clone(), q.detach().clone()
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    state = opt.state[p]
    m = state["exp_avg"] / (1 - 0.9 ** 12)
    v = state["exp_avg_sq"] / (1 - 0.999 ** 12)
    agar = (m * m / torch.maximum(v, m * m)).tolist()
    assert agar[0] == pytest.approx(1.0, abs=1e-6) and agar[1] < 0.05
    mean = sum(agar) / 2
    trust = 0.1 + 0.9 * mean
    gate = [trust ** 0.5 * min(max(a / mean, 0.1), 1.0) for a in agar]
    assert gate[0] == pytest.approx(trust ** 0.5) and gate[1] == pytest.approx(trust ** 0.5 * 0.1)
    step_p, step_q = (p.detach() - before_p).tolist(), (q.detach() - before_q).tolist()
    for i in range(2):  # float32 differences of parameters ~0.1: good to ~1e-8 absolute
        assert step_p[i] == pytest.approx(gate[i] * step_q[i], abs=1e-8)
    assert opt.stats()["casmo_confidence"] == pytest.approx(sum(gate) / 2, rel=1e-5)
    assert opt.stats()["casmo_agar"] == pytest.approx(mean, rel=1e-5)


def test_calibrating_confidence_agar_is_the_originals_clamped_passthrough():
    grads = [1.0, 0.5, -1.0, 2.0]
    _, _, stats = _scalar_steps(grads, calibration_steps=10, calibrating_confidence="agar", c_min=0.6)
    for s, a in zip(stats, _hand_agar(grads)):
        assert s["casmo_confidence"] == pytest.approx(min(max(a, 0.6), 1.0), rel=1e-5)


def test_group_confidence_is_clamped():
    assert group_confidence(1.0, 0.1, 0.01, 0.3) == 1.0
    assert group_confidence(0.0, 0.5, 0.01, 0.3) == pytest.approx(0.3)


# -- state -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["group", "element"])
@pytest.mark.parametrize("stop_at", [3, 9])  # mid-calibration (window 6) and after it
def test_state_dict_round_trip_continues_bit_exact(tmp_path: Path, granularity: str, stop_at: int):
    kw = dict(lr=1e-2, betas=BETAS, weight_decay=0.01, calibration_steps=6, granularity=granularity)
    model, x, y = _toy()
    opt = CASMO(model.parameters(), **kw)
    ref_stats = _train(model, opt, x, y, range(16))

    model2, _, _ = _toy()
    opt2 = CASMO(model2.parameters(), **kw)
    _train(model2, opt2, x, y, range(stop_at))
    torch.save({"model": model2.state_dict(), "optimizer": opt2.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    model3, _, _ = _toy(seed=1)  # different initial weights: everything must come from the checkpoint
    model3.load_state_dict(saved["model"])
    opt3 = CASMO(model3.parameters(), **kw)
    opt3.load_state_dict(saved["optimizer"])
    stats = _train(model3, opt3, x, y, range(stop_at, 16))
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)
    assert stats == ref_stats[stop_at:]
    assert opt3.casmo == opt.casmo


def test_load_refuses_an_adamw_state():
    model, _, _ = _toy()
    state = torch.optim.AdamW(model.parameters()).state_dict()
    with pytest.raises(ValueError, match="not a CASMO optimizer state"):
        CASMO(model.parameters()).load_state_dict(state)


# -- config and registry -----------------------------------------------------------------------------

def test_registry_matches_the_config_choices():
    assert set(OPTIMIZERS) == set(typing.get_args(typing.get_type_hints(TrainConfig)["optimizer"]))
    opt = OPTIMIZERS["casmo"]([{"params": [torch.nn.Parameter(torch.zeros(2))]}], TrainConfig())
    assert isinstance(opt, CASMO) and opt.calibration_steps == TrainConfig().casmo.calibration_steps


def test_adamw_run_ids_unchanged():
    # First recorded on main (3404f49) before train.casmo existed. Re-recorded when issue 10 changed the
    # data section (probe families, wording split, format 2): the generated benchmark differs, so every
    # temporal run's identity changed with it on purpose. Options that change nothing (the optimizer
    # choice left at adamw, train.strategy, mixed precision off) must never move it.
    assert RunConfig().config_hash() == "2e03c82997b650de900a9b2a26df1914d7f4c2abda9a39570b0e8c00801d99bd"
    assert "casmo" not in RunConfig().to_dict()["train"]
    cfg = RunConfig()
    cfg.train.optimizer = "casmo"
    assert cfg.to_dict()["train"]["casmo"]["calibration_steps"] == 20
    assert cfg.config_hash() != RunConfig().config_hash()


@pytest.mark.parametrize("field, bad", [("calibration_steps", "1"), ("granularity", "row"), ("c_min", "1.5"),
                                        ("robustness", "-1"), ("nope", "1")])
def test_bad_casmo_option_exits_2_naming_the_field(tmp_path: Path, capsys, monkeypatch, field: str, bad: str):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["--mode", "synthetic", "--method", "lora", "--run-root", str(tmp_path / "runs"),
                     "--set", "train.optimizer=casmo", "--set", f"train.casmo.{field}={bad}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"train.casmo.{field}" in lines[0], lines
    assert not (tmp_path / "runs").exists()


# -- end to end --------------------------------------------------------------------------------------

TINY = ["--mode", "synthetic", "--set", "data.num_facts=8", "--set", "train.epochs=2",
        "--set", "train.max_batch_size=4", "--set", "train.progress=false", "--method", "lora",
        "--set", "train.optimizer=casmo"]


@pytest.mark.slow
def test_kill_mid_calibration_then_resume_equals_uninterrupted(tmp_path: Path, monkeypatch):
    # Window 10 and a SIGUSR2 after the 7th optimizer step overall: period 1 (its steps are counted from
    # the period's own start, after the base eval) is still calibrating when the run stops.
    args = [*TINY, "--set", "train.casmo.calibration_steps=10"]
    ref_root, root = tmp_path / "ref", tmp_path / "run"
    assert cli.main([*args, "--run-root", str(ref_root)]) == 0
    ref_rows = train_records(only_run_dir(ref_root))
    assert {"casmo_confidence", "casmo_agar", "casmo_calibrating"} <= set(ref_rows[0])

    restore_step = signal_after_steps(monkeypatch, 7)
    assert cli.main([*args, "--run-root", str(root)]) == 75
    run_dir = only_run_dir(root)
    stopped = train_records(run_dir)
    assert stopped[-1]["period"] == 1 and stopped[-1]["casmo_calibrating"] == 1.0  # killed mid-calibration
    restore_step()
    assert cli.main([*args, "--run-root", str(root)]) == 0
    assert comparable(read_results(run_dir)) == comparable(read_results(only_run_dir(ref_root)))
    strip = ("lr", "loss", "grad_norm", "casmo_confidence", "casmo_agar", "casmo_calibrating", "period", "step")
    assert ([{k: r[k] for k in strip} for r in train_records(run_dir)]
            == [{k: r[k] for k in strip} for r in ref_rows])
    assert any(r["casmo_calibrating"] == 0.0 for r in ref_rows)  # the window ends inside a period


def test_trace_script_reads_a_log(tmp_path: Path):
    from scripts.casmo_trace import load_trace, plot, summarize

    log = tmp_path / "train_log.jsonl"
    rows = [{"event": "eval", "period": 0}]
    rows += [{"event": "train", "period": 1, "step": s, "casmo_confidence": 1.0 if s <= 2 else 0.5,
              "casmo_agar": 0.2, "casmo_calibrating": float(s <= 2)} for s in range(1, 5)]
    rows += [{"event": "train", "period": 2, "step": s, "casmo_confidence": 1.0, "casmo_agar": 0.1,
              "casmo_calibrating": 1.0} for s in range(1, 3)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trace = load_trace(tmp_path)
    assert [t["global_step"] for t in trace] == [1, 2, 3, 4, 5, 6]
    lines = summarize(trace)
    plot(trace, tmp_path / "trace.png")
    assert (tmp_path / "trace.png").stat().st_size > 0
    assert any("period 1" in line and "calibration ended after step 2" in line for line in lines)
    assert any("period 2" in line and "WARNING" in line and "calibration_steps" in line for line in lines)
    assert any("mean confidence after calibration: 0.5" in line for line in lines)


def test_a_window_not_shorter_than_the_period_is_reported_never_silently_adamw():
    opt = CASMO([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, calibration_steps=20)
    problem = horizon_problem(opt, 20)
    assert problem and "train.casmo.calibration_steps=20" in problem and "20 optimizer steps" in problem
    assert horizon_problem(opt, 21) is None
    assert horizon_problem(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))]), 1) is None


def test_the_report_draws_the_confidence_trace_and_labels_the_optimizer_variant(tmp_path: Path):
    """CASMO next to AdamW in one report: two variants of lora, the trace plotted for the CASMO one only."""
    from eval_and_metrics.report import build_report

    root = tmp_path / "runs"
    base = [*TINY, "--method", "lora", "--set", "train.epochs=3"]
    assert cli.main([*base, "--run-root", str(root / "adamw")]) == 0
    assert cli.main([*base, "--set", "train.optimizer=casmo", "--set", "train.casmo.calibration_steps=2",
                     "--run-root", str(root / "casmo")]) == 0
    report = build_report(root, tmp_path / "report")
    plots = [p for paths in report["plots"].values() for p in paths]
    assert any(p.endswith("-confidence.png") for p in plots), plots
    labels = {g["label"] for g in report["groups"]}
    assert any("casmo" in label for label in labels) and len(labels) == 2, labels
