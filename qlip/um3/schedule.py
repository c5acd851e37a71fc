"""The fraction of text-only samples in a batch: Eq. 7's calm-down schedule, or a constant mix.

Eq. 7 (paper Sec. 4.1), after the learning-rate warm-up it is modelled on: the text-only share
decays linearly from ``r_0`` at step 0 to ``r_T`` at step ``T`` and stays there,

    r(t) = (r_T - r_0) / T * (t - T) + r_T   if t <= T,      r(t) = r_T   otherwise,

so the language ability does not collapse at the start of multimodal training. The ablation
(``constant``) uses ``r_T`` from the first step. A pure function of the step: resume stays exact.
"""
from __future__ import annotations

from ..errors import ConfigError

SCHEDULES = ("calm_down", "constant")


def text_fraction(step: int, r0: float, rT: float, T: int, schedule: str = "calm_down") -> float:
    """``r(step)`` (``step`` 0-based, the optimizer step the batch belongs to)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"mixing schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant" or T <= 0 or step > T:
        return rT
    return (rT - r0) / T * (step - T) + rT


def text_rows(step: int, global_batch: int, r0: float, rT: float, T: int, schedule: str = "calm_down") -> int:
    """Text-only rows of a global batch of ``global_batch`` samples: ``round(r(step) * B)``."""
    return int(round(text_fraction(step, r0, rT, T, schedule) * global_batch))
