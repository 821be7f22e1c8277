"""CASMO: AdamW whose step is scaled by a confidence read from the gradients' signal-to-noise ratio.

Source: the CASMO optimizer ("Confident Adaptive Selective Momentum Optimizer", github.com/abderahmane-ai/
CASMO, MIT), whose benchmark B7 fine-tunes an LLM with LoRA on four tasks in sequence. Its v0.1-v0.3
algorithm (casmo.py with the calibration phase) is the `group` granularity here; the per-coordinate gate
of its v0.4 redesign (CHANGELOG 0.4.0, research/REDESIGN.md) is the `element` granularity. This is a
re-implementation from those formulas, not a copy; docs/optimizers.md lists where it departs and why.

Idea: Adam's second moment cannot tell a large consistent gradient from a large noisy one. With the
bias-corrected moments m, v of Adam, m^2 estimates the signal E[g]^2 and v - m^2 the variance, so

    AGAR_i = m_i^2 / (m_i^2 + max(v_i - m_i^2, 0) + eps_a) = m_i^2 / (max(v_i, m_i^2) + eps_a)   in [0, 1)

is 1 for a constant gradient and tends to 0 for a zero-mean one (eps_a = 1e-20 only guards 0/0: a
coordinate that never had a gradient reads 0). The update is AdamW's with the step scaled:

    p <- p * (1 - lr * wd)                                  (decoupled decay, not scaled, as the original)
    p <- p - lr * C * m / (sqrt(v) + eps)

group (v0.1): AGAR = mean of AGAR_i over every trainable coordinate (all parameter groups together).
    For the first `calibration_steps` steps C = 1 (plain AdamW, bit for bit) and AGAR is collected. Then,
    from those samples (mean mu, population std s, median): sigma = max(s, 0.01), tau = clip(median,
    0.01, 0.5), c_min = 0.1 if s/mu > 0.5, 0.3 if > 0.3, else 0.5, and from the next step on
        C = clamp(c_min + (1 - c_min) * sigmoid((AGAR - tau) / sigma), c_min, 1).
element (v0.4): per tensor, a = mean_i AGAR_i, trust = c_min + (1 - c_min) * a and
        C_i = trust^robustness * clip(AGAR_i / a, rel_floor, 1)
    after the same window of plain AdamW (here only a warm-up of the moments; no statistics are used).

With calibrating_confidence=agar, C = clamp(AGAR, c_min, 1) (elementwise in element mode) during the
window instead of 1: what the original did before calibrating, and all B7 ever ran (see the docs).

The trainer rebuilds the optimizer every period, so the moments and the calibration restart each period.
All state round-trips through state_dict(): per-parameter step/exp_avg/exp_avg_sq as torch's AdamW, plus a
"casmo" entry (step count, AGAR samples, calibrated tau/sigma/c_min, last stats) of plain Python values.
stats() gives the trainer's step log casmo_confidence, casmo_agar and casmo_calibrating.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any, overload

import torch

AGAR_EPS = 1e-20  # guards 0/0 only: tiny next to any squared gradient that float32 can hold
SIGMA_FLOOR = 0.01  # the original's MIN_STD_THRESHOLD
TAU_RANGE = (0.01, 0.5)  # the original's default tau_clip_range
# The original's adaptive c_min from the coefficient of variation of the calibration AGAR:
# a wide (bimodal) spread lets confidence go low, a narrow one (pervasive noise) keeps it high.
CV_HIGH, CV_MEDIUM = 0.5, 0.3
C_MIN_BY_CV = (0.1, 0.3, 0.5)


def calibrate(samples: list[float]) -> dict[str, float]:
    """tau, sigma and c_min from the AGAR values of the calibration window (the original's rule)."""
    mu = statistics.fmean(samples)
    spread = statistics.pstdev(samples)
    cv = spread / (mu + 1e-8)
    c_min = C_MIN_BY_CV[0] if cv > CV_HIGH else C_MIN_BY_CV[1] if cv > CV_MEDIUM else C_MIN_BY_CV[2]
    tau = min(max(statistics.median(samples), TAU_RANGE[0]), TAU_RANGE[1])
    return {"tau": tau, "sigma": max(spread, SIGMA_FLOOR), "c_min": c_min}


def group_confidence(agar: float, tau: float, sigma: float, c_min: float) -> float:
    sig = 1.0 / (1.0 + math.exp(-(agar - tau) / sigma))
    return min(max(c_min + (1.0 - c_min) * sig, c_min), 1.0)


class CASMO(torch.optim.Optimizer):
    """AdamW scaled by an AGAR confidence; see the module docstring for the formulas and options."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        calibration_steps: int = 20,
        granularity: str = "group",
        c_min: float = 0.1,
        robustness: float = 0.5,
        rel_floor: float = 0.1,
        calibrating_confidence: str = "one",
    ):
        if granularity not in ("group", "element"):
            raise ValueError(f"granularity must be 'group' or 'element' (got {granularity!r})")
        if calibrating_confidence not in ("one", "agar"):
            raise ValueError(f"calibrating_confidence must be 'one' or 'agar' (got {calibrating_confidence!r})")
        if calibration_steps < 2:
            raise ValueError(f"calibration_steps must be >= 2 for a spread (got {calibration_steps})")
        if not (0 <= c_min <= 1 and 0 <= rel_floor <= 1 and robustness >= 0):
            raise ValueError(
                f"need 0 <= c_min, rel_floor <= 1 and robustness >= 0 (got {c_min}, {rel_floor}, {robustness})"
            )
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.calibration_steps = calibration_steps
        self.granularity = granularity
        self.c_min = c_min
        self.robustness = robustness
        self.rel_floor = rel_floor
        self.calibrating_confidence = calibrating_confidence
        # Global (not per-parameter) state; state_dict() carries it under "casmo".
        self.casmo: dict[str, Any] = {
            "num_steps": 0,
            "agar_samples": [],
            "calibrated": False,
            "tau": 0.0,
            "sigma": 0.0,
            "c_min": 0.0,
            "last_agar": 0.0,
            "last_confidence": 1.0,
            "last_calibrating": 1,
        }

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["casmo"] = {k: list(v) if isinstance(v, list) else v for k, v in self.casmo.items()}
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "casmo" not in state_dict:
            raise ValueError("not a CASMO optimizer state (no 'casmo' entry); was it saved by another optimizer?")
        state_dict = dict(state_dict)
        casmo = state_dict.pop("casmo")
        super().load_state_dict(state_dict)
        self.casmo = {k: list(v) if isinstance(v, list) else v for k, v in casmo.items()}

    def horizon_problem(self, total_steps: int) -> str | None:
        """Why this optimizer cannot do what it is configured for in a period of `total_steps` steps."""
        if self.calibration_steps >= total_steps:
            return (
                f"train.casmo.calibration_steps={self.calibration_steps} >= the {total_steps} optimizer steps "
                "of this period: it never leaves calibration and trains as plain AdamW (lower the window)"
            )
        return None

    def stats(self) -> dict[str, float]:
        return {
            "casmo_confidence": float(self.casmo["last_confidence"]),
            "casmo_agar": float(self.casmo["last_agar"]),
            "casmo_calibrating": float(self.casmo["last_calibrating"]),
        }

    # -- the step --------------------------------------------------------------------------
    # torch.optim.Optimizer.step's overloads: no closure, no loss
    @overload
    def step(self, closure: None = None) -> None: ...
    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Pass 1, exactly torch's single-tensor AdamW up to the parameter update: step count, decoupled
        # decay, moments. The update waits until AGAR over every coordinate is known.
        active: list[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]] = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise NotImplementedError("CASMO does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if group["weight_decay"] != 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                active.append((p, state, group))
        if not active:
            return loss

        c = self.casmo
        c["num_steps"] += 1
        calibrating = c["num_steps"] <= self.calibration_steps
        ratios = [self._agar(state, group) for _, state, group in active]
        numel = sum(r.numel() for r in ratios)
        agar = float(sum(r.sum(dtype=torch.float64) for r in ratios)) / numel

        gates: Sequence[torch.Tensor | None]
        if calibrating and self.calibrating_confidence == "one":
            gates, confidence = [None] * len(active), 1.0
        elif self.granularity == "group":
            if calibrating:
                confidence = min(max(agar, self.c_min), 1.0)
            else:
                confidence = group_confidence(agar, c["tau"], c["sigma"], c["c_min"])
            gates = [None] * len(active)
        else:
            element_gates = [r.clamp(self.c_min, 1.0) if calibrating else self._element_gate(r) for r in ratios]
            confidence = float(sum(g.sum(dtype=torch.float64) for g in element_gates)) / numel
            gates = element_gates

        # Pass 2: torch's AdamW update with lr * confidence (a per-coordinate gate in element mode).
        for (p, state, group), gate in zip(active, gates):
            beta1, beta2 = group["betas"]
            step = state["step"].item()
            bias_correction1 = 1 - beta1**step
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            denom = (state["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
            exp_avg = state["exp_avg"] if gate is None else state["exp_avg"] * gate.to(p.dtype)
            lr = group["lr"] * confidence if gate is None else group["lr"]
            p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))

        if calibrating:
            c["agar_samples"].append(agar)
            if c["num_steps"] == self.calibration_steps:
                c.update(calibrate(c["agar_samples"]), calibrated=True, agar_samples=[])
        c.update(last_agar=agar, last_confidence=confidence, last_calibrating=int(calibrating))
        return loss

    @staticmethod
    def _agar(state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """AGAR_i of one tensor from its bias-corrected moments, in float32."""
        beta1, beta2 = group["betas"]
        step = state["step"].item()
        m = state["exp_avg"].float() / (1 - beta1**step)
        v = state["exp_avg_sq"].float() / (1 - beta2**step)
        signal = m.square()
        return signal / (torch.maximum(v, signal) + AGAR_EPS)

    def _element_gate(self, ratio: torch.Tensor) -> torch.Tensor:
        mean = ratio.mean()
        trust = self.c_min + (1 - self.c_min) * mean
        focus = (ratio / (mean + AGAR_EPS)).clamp(self.rel_floor, 1.0)
        return trust.pow(self.robustness) * focus
