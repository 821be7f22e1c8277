"""Config sections of the optimizers in training/optimizers (`train.casmo`, ...).

They live here, outside the training.optimizers package, because importing anything in that package
runs its __init__, which imports torch; training/config.py stays torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from data.fields import Range


@dataclass
class CasmoOptions:
    # optimizer steps of plain AdamW per period during which AGAR is collected; the optimizer is
    # rebuilt every period, so calibration restarts every period (keep it below a period's steps)
    calibration_steps: Annotated[int, Range(2, 1_000_000)] = 20
    # group: one confidence for all trainable parameters (v0.1); element: one per coordinate (v0.4)
    granularity: Literal["group", "element"] = "group"
    # confidence floor: element mode's trust floor, and group mode's floor while calibrating with
    # calibrating_confidence=agar (after calibration group mode sets it from the AGAR spread)
    c_min: Annotated[float, Range(0, 1)] = 0.1
    # element mode: exponent of the absolute trust factor (0 = only the relative focus gate)
    robustness: Annotated[float, Range(0, 10)] = 0.5
    # element mode: floor of the relative per-coordinate focus factor (1 = no per-coordinate gate)
    rel_floor: Annotated[float, Range(0, 1)] = 0.1
    # confidence while calibrating: one = plain AdamW; agar = clamp(AGAR, c_min, 1), as the original did
    calibrating_confidence: Literal["one", "agar"] = "one"
