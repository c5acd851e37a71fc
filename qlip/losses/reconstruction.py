"""Pixel reconstruction losses.

The paper writes ``L_mse = ||X_hat - X||_2`` and trains with the mean squared error (Table 8:
``alpha_r`` = 1e3 in stage 1, 1 in stage 2); we compute the mean over all elements (batch,
channels, pixels) in whatever pixel space both tensors share (QLIP: CLIP-normalised). L1 (as in
BSQ-ViT) is available as an option.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ReconstructionLoss", "reconstruction_loss", "RECONSTRUCTION_KINDS"]

RECONSTRUCTION_KINDS = ("mse", "l1")


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """``mean((recon - target)**2)`` for ``kind="mse"`` (paper), ``mean(|recon - target|)`` for ``"l1"``."""
    if recon.shape != target.shape:
        raise ValueError(f"reconstruction and target shapes differ: {tuple(recon.shape)} vs {tuple(target.shape)}")
    if kind == "mse":
        return F.mse_loss(recon, target)
    if kind == "l1":
        return F.l1_loss(recon, target)
    raise ValueError(f"reconstruction loss kind must be one of {RECONSTRUCTION_KINDS}, got {kind!r}")


class ReconstructionLoss(nn.Module):
    """Module form of :func:`reconstruction_loss` (``kind`` = ``"mse"`` or ``"l1"``)."""

    def __init__(self, kind: str = "mse"):
        super().__init__()
        if kind not in RECONSTRUCTION_KINDS:
            raise ValueError(f"reconstruction loss kind must be one of {RECONSTRUCTION_KINDS}, got {kind!r}")
        self.kind = kind

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return reconstruction_loss(recon, target, self.kind)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
