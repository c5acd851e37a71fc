"""Static key/value cache for autoregressive decoding, one per attention layer.

Preallocated ``(batch, n_kv_heads, max_len, head_dim)`` buffers (as in gpt-fast / lingua): every
step writes its keys and values at a position offset and attends to the prefix written so far,
so decoding never reallocates. Keys are stored *after* RoPE (and after QK-norm), values as
projected; with grouped-query attention only the ``n_kv_heads`` heads are stored.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..errors import QLIPError


class KVCache:
    """Keys and values of one attention layer for up to ``max_len`` positions.

    ``length`` is the end of the last write (the number of cached positions when decoding left to
    right); a model uses it as the default start of its next step. Writing at an earlier start
    rewinds it (the later positions are then ignored and overwritten).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` ``(B, n_kv_heads, T, head_dim)`` at positions ``[start, start + T)`` and
        return the keys and values of positions ``[0, start + T)`` (views into the cache, in the
        cache's dtype). ``B`` may be smaller than the cache's batch (its first rows are used)."""
        B, _, T, _ = k.shape
        end = start + T
        if start < 0:
            raise QLIPError(f"KV cache: negative start position {start}")
        if end > self.max_len:
            raise QLIPError(f"KV cache overflow: writing positions [{start}, {end}) but the cache holds "
                            f"max_len={self.max_len}; allocate a longer cache (e.g. prompt + new tokens)")
        if B > self.batch or k.shape[1] != self.k.shape[1] or k.shape[3] != self.k.shape[3]:
            raise QLIPError(f"KV cache: got keys {tuple(k.shape)} for a cache of (batch<={self.batch}, "
                            f"{self.k.shape[1]}, T, {self.k.shape[3]})")
        self.k[:B, :, start:end] = k
        self.v[:B, :, start:end] = v
        self.length = end
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def reset(self) -> None:
        """Forget the cached positions (the buffers are zeroed and reused)."""
        self.k.zero_()
        self.v.zero_()
        self.length = 0

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, n_kv_heads={self.k.shape[1]}, max_len={self.max_len}, "
                f"head_dim={self.k.shape[3]}, length={self.length}, dtype={self.k.dtype})")
