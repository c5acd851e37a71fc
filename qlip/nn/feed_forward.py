"""Llama-style SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``, no biases by default.

A separate class from :class:`qlip.nn.layers.SwiGLU` (the EVA-02 variant of the QLIP towers,
always with biases and optional sub-LN, named ``w1, w2, w3``); the names here are those of
Hugging Face Llama / Qwen (``gate_proj``, ``up_proj``, ``down_proj``) so weights map one to one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLUFeedForward(nn.Module):
    """``dim -> hidden -> dim`` gated MLP (Shazeer 2020), as in Llama."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
