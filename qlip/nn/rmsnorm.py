"""Root-mean-square layer norm (Zhang & Sennrich 2019), as used by Llama, Qwen and Mistral.

``y = weight * (x / sqrt(mean(x^2) + eps))``: no mean subtraction and no bias. The statistics are
computed in float32 and the normalised tensor is cast back to the input dtype *before* the
multiplication by ``weight``, exactly as in Llama / Hugging Face ``LlamaRMSNorm``. With a float32
``weight`` and a bfloat16 input the result is therefore float32 (type promotion), as there.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMS norm over the last dimension of size ``dim``; ``weight`` starts at 1."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
