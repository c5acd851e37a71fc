"""Causal multi-head self-attention with grouped-query attention, QK-norm, RoPE and a KV cache.

Per layer (``H`` query heads, ``H_kv`` key/value heads of size ``D``, ``H_kv`` divides ``H``)::

    q, k, v = q_proj(x), k_proj(x), v_proj(x)            # (B, T, H*D), (B, T, H_kv*D) twice
    q, k = q_norm(q), k_norm(k)                           # optional: RMSNorm over each head's D
    q, k = apply_rotary(q, k, cos, sin)                   # RoPE after QK-norm (Qwen3 order)
    k, v = cache.update(k, v, start)                      # optional: keys [0, start + T)
    y = o_proj(SDPA(q, k, v, mask))                       # query head h uses kv head h // (H / H_kv)

Grouped-query attention uses SDPA's ``enable_gqa`` on torch >= 2.5 and repeats k/v on older
versions. Without a mask the attention is causal (with a cache: queries at positions
``[start, start + T)`` against keys ``[0, start + T)``, see :mod:`qlip.nn.masks`). A given mask is
used as is (boolean, ``True`` = attend, ``(Tq, Tk)`` or ``(B, 1, Tq, Tk)``) and must contain the
causality itself. The rotary tables are passed in, so the caller chooses the positions (1-D,
per-row, or its own 2-D tables for image tokens); ``rope=None`` means no position embedding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import compat as _compat
from . import precision as _precision
from .kv_cache import KVCache
from .masks import causal_mask
from .rmsnorm import RMSNorm
from .rope_1d import apply_rotary


SDPA_HAS_GQA = _compat.SDPA_HAS_GQA  # F.scaled_dot_product_attention(..., enable_gqa=True); tests flip it


def _upcast_on_this_cpu(q: torch.Tensor) -> bool:
    """bf16 / fp16 attention on a CPU without AMX: torch's CPU flash kernel is 1.8-2.7x slower in bf16
    than in fp32 at the sequence lengths of the demos (64-80 tokens; equal at 256; measured on an AMD
    EPYC Zen 4, docs/performance.md), so such attention runs in fp32 and returns to the input dtype."""
    return q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16) and not _precision.cpu_has_amx_bf16()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
         is_causal: bool = False, dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA with grouped-query attention: ``q`` ``(B, H, Tq, D)``, ``k, v`` ``(B, H_kv, Tk, D)``.
    Every attention of the library goes through here (the ViT towers with ``H_kv == H``)."""
    if _upcast_on_this_cpu(q):
        with torch.autocast("cpu", enabled=False):
            y = _sdpa(q.float(), k.float(), v.float(), mask, is_causal, dropout_p)
        return y.to(q.dtype)
    return _sdpa(q, k, v, mask, is_causal, dropout_p)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool,
          dropout_p: float) -> torch.Tensor:
    n_heads, n_kv = q.shape[1], k.shape[1]
    if n_heads == n_kv:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              dropout_p=dropout_p, enable_gqa=True)
    rep = n_heads // n_kv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)


class CausalSelfAttention(nn.Module):
    """Llama / Qwen attention; parameter names follow Hugging Face (``q_proj`` ... ``o_proj``,
    ``q_norm``, ``k_norm``).

    ``qkv_bias`` adds biases to q/k/v (Qwen2), ``out_bias`` to the output projection (Llama's
    ``attention_bias`` switches on both). ``qk_norm`` adds an RMSNorm of size ``head_dim`` shared
    by all heads, applied to queries and keys before RoPE (Qwen3).
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, qk_norm: bool = False, qkv_bias: bool = False,
                 out_bias: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = dim // n_heads if head_dim is None else head_dim
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads {n_heads} is not divisible by n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                start: int = 0) -> torch.Tensor:
        """``x`` ``(B, T, dim)`` at positions ``[start, start + T)``; ``rope = (cos, sin)`` for
        those positions (see :func:`qlip.nn.rope_1d.apply_rotary`); ``start`` matters only with a
        ``cache``. Returns ``(B, T, dim)``."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, start)
        is_causal = False
        if mask is None:
            if k.shape[2] == T:
                is_causal = True                           # no cached prefix: plain causal
            elif T > 1:
                mask = causal_mask(T, k.shape[2] - T, device=x.device)
            # one query after a cached prefix sees every key: no mask
        y = sdpa(q, k, v, mask=mask, is_causal=is_causal)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}"
