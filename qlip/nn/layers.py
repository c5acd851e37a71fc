"""Transformer building blocks shared by the QLIP towers: attention, MLPs, pre-norm block.

Nothing here knows about QLIP. Attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels where
the backend has them).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .rope import RoPE2D
from .causal_attention import sdpa


@dataclass
class BlockConfig:
    """Shape and switches of one transformer tower (all blocks of a tower are identical)."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    q_bias: bool = True
    k_bias: bool = True
    v_bias: bool = True
    swiglu: bool = False      # SwiGLU MLP (w1, w2 gate, w3) instead of fc1-act-fc2
    subln: bool = False       # sub-LN: LayerNorm before attention out-proj and inside the MLP
    rope: bool = False        # 2D rotary embedding (vision towers only)
    act: str = "gelu"         # activation of the plain MLP: "gelu" (erf) or "quick_gelu"
    ln_eps: float = 1e-5

    def validate(self, name: str) -> None:
        if self.width % self.heads != 0:
            raise ValueError(f"{name}: width {self.width} is not divisible by heads {self.heads}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"{name}: unknown activation {self.act!r}; choose from {sorted(ACTIVATIONS)}")
        if self.rope and (self.width // self.heads) % 4 != 0:
            raise ValueError(f"{name}: 2D RoPE needs head_dim divisible by 4, got {self.width // self.heads}")


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv matmul and per-projection bias switches.

    The q, k and v biases are separate parameters (``None`` when switched off), so a missing k
    bias stays exactly zero during training, as in EVA-02.
    """

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        d = cfg.width
        self.heads = cfg.heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(d)) if cfg.q_bias else None
        self.k_bias = nn.Parameter(torch.zeros(d)) if cfg.k_bias else None
        self.v_bias = nn.Parameter(torch.zeros(d)) if cfg.v_bias else None
        self.inner_ln = nn.LayerNorm(d, eps=cfg.ln_eps) if cfg.subln else None
        self.out = nn.Linear(d, d)

    def qkv_bias(self) -> Optional[torch.Tensor]:
        parts = (self.q_bias, self.k_bias, self.v_bias)
        if all(p is None for p in parts):
            return None
        ref = next(p for p in parts if p is not None)
        return torch.cat([p if p is not None else torch.zeros_like(ref) for p in parts])

    def forward(self, x: torch.Tensor, rope: Optional[RoPE2D] = None, causal: bool = False) -> torch.Tensor:
        B, N, D = x.shape
        qkv = F.linear(x, self.qkv.weight, self.qkv_bias()).view(B, N, 3, self.heads, D // self.heads)
        if rope is not None and not (torch.is_grad_enabled() and qkv.requires_grad):
            rope.rotate_(qkv[:, :, :2])  # q and k together, in the qkv buffer: no copies
            rope = None
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = rope(q), rope(k)
        y = sdpa(q, k, v, is_causal=causal)
        y = y.transpose(1, 2).reshape(B, N, D)
        if self.inner_ln is not None:
            y = self.inner_ln(y)
        return self.out(y)


class MLP(nn.Module):
    """``fc2(ffn_ln(act(fc1 x)))``; ``ffn_ln`` only with sub-LN."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.act = ACTIVATIONS[cfg.act]
        self.ffn_ln = nn.LayerNorm(cfg.mlp_dim, eps=cfg.ln_eps) if cfg.subln else None
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.ffn_ln is not None:
            h = self.ffn_ln(h)
        return self.fc2(h)


class SwiGLU(nn.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))``; ``ffn_ln`` only with sub-LN (EVA-02)."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.w2 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.ffn_ln = nn.LayerNorm(cfg.mlp_dim, eps=cfg.ln_eps) if cfg.subln else None
        self.w3 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.w1(x)) * self.w2(x)
        if self.ffn_ln is not None:
            h = self.ffn_ln(h)
        return self.w3(h)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1 x)``, then ``x + mlp(ln2 x)``."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.mlp = SwiGLU(cfg) if cfg.swiglu else MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Optional[RoPE2D] = None, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), rope=rope, causal=causal)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A stack of identical pre-norm blocks. ``forward(..., return_layers=True)`` keeps every output."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.grad_checkpointing = False

    def forward(self, x, rope=None, causal=False, return_layers=False):
        layers = []
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, rope, causal, use_reentrant=False)
            else:
                x = blk(x, rope=rope, causal=causal)
            if return_layers:
                layers.append(x)
        return (x, layers) if return_layers else x
