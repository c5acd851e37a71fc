"""2D rotary position embedding in the EVA-02 layout used by QLIP.

Each attention head of size ``head_dim`` is split in two halves: the first half rotates with the
token's row index, the second half with its column index. Within a half, channels rotate in
*interleaved* pairs ``(x0, x1) -> (-x1, x0)`` (GPT-J style, not the NeoX half split), and each
frequency is used for one pair (``f0, f0, f1, f1, ...``).

Positions are interpolated to a fixed ``16 x 16`` pre-training grid (``pt_grid``): a grid of
``G`` tokens per side uses positions ``arange(G) / G * 16``. This is what the released
checkpoints were trained with (e.g. G = 32 for patch 8 at 256 px uses 0, 0.5, 1, ...).
"""
from __future__ import annotations

import torch
from torch import nn


def rope_2d_table(head_dim: int, grid: int, pt_grid: int = 16, theta: float = 10000.0):
    """Return ``(cos, sin)``, each ``(grid * grid, head_dim)`` float32, rows in raster order.

    Computed in float32 in the same order of operations as the reference implementation, so
    a model cast to float64 afterwards reproduces it bit for bit.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2D RoPE needs a head dimension divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / (theta ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid) / grid * pt_grid
    freqs = torch.einsum("i,f->if", t, freqs)               # (G, half/2)
    freqs = freqs.repeat_interleave(2, dim=-1)              # (G, half): f0 f0 f1 f1 ...
    rows = freqs[:, None, :].expand(grid, grid, half)       # varies with the row index
    cols = freqs[None, :, :].expand(grid, grid, half)       # varies with the column index
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """``(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)`` along the last dimension."""
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def _complex_viewable(x: torch.Tensor) -> bool:
    """Whether ``view_as_complex(x.unflatten(-1, (-1, 2)))`` is legal (pairs adjacent, even strides)."""
    return x.stride(-1) == 1 and x.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in x.stride()[:-1])


class RoPE2D(nn.Module):
    """Applies the 2D rotary embedding to ``(B, heads, N, head_dim)`` tensors.

    ``skip`` leading tokens (the cls token of the encoder) are left unrotated. The tables are
    non-persistent buffers: they are recomputed, never loaded from checkpoints.
    """

    def __init__(self, head_dim: int, grid: int, skip: int = 0, pt_grid: int = 16):
        super().__init__()
        self.head_dim, self.grid, self.skip, self.pt_grid = head_dim, grid, skip, pt_grid
        cos, sin = rope_2d_table(head_dim, grid, pt_grid)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos.to(x.dtype), self.sin.to(x.dtype)
        return x * cos + rotate_pairs(x) * sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.skip == 0:
            return self._rotate(x)
        head, rest = x[..., : self.skip, :], x[..., self.skip :, :]
        return torch.cat([head, self._rotate(rest)], dim=-2)

    def rotate_(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate ``(B, N, ..., head_dim)`` in place (tokens on dim 1, any head dims between) and
        return it; the ``skip`` leading tokens are left alone. Inference only: no autograd.

        The attention rotates q and k together as one strided view of its qkv buffer, so there is
        no extra copy, no ``cat`` for the cls token, and one pass over the data in float32/64,
        where the interleaved pair rotation is a complex multiplication by ``cos + i sin``.
        """
        rest = x[:, self.skip:]
        shape = (rest.shape[1],) + (1,) * (rest.dim() - 3) + (self.head_dim,)
        if rest.dtype in (torch.float32, torch.float64) and _complex_viewable(rest):
            # cos/sin repeat each frequency for both channels of a pair: take one of each
            table = torch.complex(self.cos[:, 0::2].to(rest.dtype), self.sin[:, 0::2].to(rest.dtype))
            torch.view_as_complex(rest.unflatten(-1, (-1, 2))).mul_(table.view(shape[:-1] + (-1,)))
            return x
        # reduced precision (no complex bf16): x * cos + (x1, x0) * (-sin, sin), rounding once
        cos = self.cos.to(rest.dtype).view(shape)
        sin = (self.sin.unflatten(-1, (-1, 2)) * self.sin.new_tensor([-1.0, 1.0])).flatten(-2)
        pairs = rest.unflatten(-1, (-1, 2))
        swapped = torch.stack((pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        rest.mul_(cos).addcmul_(swapped, sin.to(rest.dtype).view(shape))
        return x

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, grid={self.grid}, skip={self.skip}, pt_grid={self.pt_grid}"
