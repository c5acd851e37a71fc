"""Post-hoc balancing of the reconstruction and alignment objectives (paper, section 4).

Train once with the alignment loss only and once with the reconstruction (MSE) loss only; with
their converged values ``L_align(inf)`` and ``L_mse(inf)`` choose the stage-1 weights inversely
proportional to them::

    alpha_r / alpha_a = L_align(inf) / L_mse(inf)

so that both terms contribute comparably (``alpha_r * L_mse ~ alpha_a * L_align``) despite
gradient magnitudes that differ by orders of magnitude. Table 8 (QLIP-B-8, stage 1) uses
``alpha_r = 1e3``, ``alpha_a = 1``.
"""

from __future__ import annotations

import math
from typing import Tuple

from qlip.errors import QLIPError

__all__ = ["compute_loss_weights_ratio", "balanced_loss_weights"]


def _positive(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise QLIPError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise QLIPError(f"{name} must be a finite positive loss value, got {value!r}")
    return v


def compute_loss_weights_ratio(l_align_inf: float, l_mse_inf: float) -> float:
    """Return ``alpha_r / alpha_a = l_align_inf / l_mse_inf`` (converged single-objective losses).

    Raises :class:`qlip.errors.QLIPError` unless both values are finite and positive.
    """
    return _positive("l_align_inf", l_align_inf) / _positive("l_mse_inf", l_mse_inf)


def balanced_loss_weights(l_align_inf: float, l_mse_inf: float, align_weight: float = 1.0) -> Tuple[float, float]:
    """Return ``(alpha_r, alpha_a)`` with ``alpha_a = align_weight`` and the paper's ratio."""
    alpha_a = _positive("align_weight", align_weight)
    return alpha_a * compute_loss_weights_ratio(l_align_inf, l_mse_inf), alpha_a
