"""1-D rotary position embedding (RoPE) in the Llama / Hugging Face layout, with Llama-3 scaling.

Layout ("rotate half", GPT-NeoX style, *not* the interleaved pairs of :mod:`qlip.nn.rope`): a head
of size ``D`` is split in two halves and channel ``i`` rotates together with channel ``i + D/2``
by the angle ``position * inv_freq[i]``::

    rotate_half(x) = cat(-x[D/2:], x[:D/2])
    x_rot = x * cos + rotate_half(x) * sin,   cos = cos(cat(angles, angles)), same for sin

Hugging Face Llama / Qwen checkpoints are stored for this layout (their q/k projections were
permuted at conversion); Meta's original ``consolidated.*.pth`` files use interleaved pairs and
need that permutation first.

The three steps are separate so that a model can swap any of them:

* :func:`rope_inv_freq` - the ``D/2`` inverse frequencies ``theta^(-2i/D)``, optionally rescaled
  with :class:`Llama3RopeScaling` (Llama 3.1 long-context scaling);
* :func:`rope_1d_table` / :func:`rope_table_from_angles` - ``(cos, sin)`` tables for any integer
  positions (a ``(T,)`` or ``(B, T)`` tensor, so cached decoding passes ``start + arange(T)`` and
  left-padded batches pass per-row positions). A downstream model can build *its own* angles,
  e.g. a 2-D grid for image tokens (``cat(row * f_a, col * f_b)``), turn them into a table with
  :func:`rope_table_from_angles` and hand that table to the attention instead;
* :func:`apply_rotary` - rotates queries and keys with a given table.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional, Tuple

import torch

from ..errors import ConfigError

RopeTable = Tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (T, D), (B, T, D) or (B, 1, T, D)


@dataclass
class Llama3RopeScaling:
    """Llama 3.1 frequency scaling (Hugging Face ``rope_type="llama3"``).

    With ``wavelen = 2 pi / inv_freq`` and ``L = original_max_position_embeddings``:
    wavelengths shorter than ``L / high_freq_factor`` are kept, longer than ``L / low_freq_factor``
    are divided by ``factor``, and the band between interpolates linearly in ``L / wavelen``.
    The defaults are those of Llama 3.1 / 3.2.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], name: str = "rope_scaling") -> "Llama3RopeScaling":
        """Build from a dict; a Hugging Face ``rope_type``/``type`` key must say ``"llama3"`` and
        ``rope_theta`` (which newer Hugging Face configs keep in the same dict) is ignored."""
        d = dict(d)
        kind = d.pop("rope_type", d.pop("type", "llama3"))
        d.pop("rope_theta", None)
        if kind != "llama3":
            raise ConfigError(f"{name}: only rope_type 'llama3' is supported, got {kind!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{name}: unknown keys {unknown}; expected some of {sorted(known)}")
        out = cls(**d)
        out.validate(name)
        return out

    def to_dict(self) -> dict:
        return {"rope_type": "llama3", **asdict(self)}

    def validate(self, name: str = "rope_scaling") -> None:
        if not self.factor > 0:
            raise ConfigError(f"{name}.factor must be > 0, got {self.factor}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ConfigError(f"{name}: need 0 < low_freq_factor < high_freq_factor, got "
                              f"{self.low_freq_factor} and {self.high_freq_factor}")
        if not self.original_max_position_embeddings > 0:
            raise ConfigError(f"{name}.original_max_position_embeddings must be > 0, "
                              f"got {self.original_max_position_embeddings}")


def llama3_scale_inv_freq(inv_freq: torch.Tensor, scaling: Llama3RopeScaling) -> torch.Tensor:
    """Apply :class:`Llama3RopeScaling` to a vector of inverse frequencies."""
    ctx = scaling.original_max_position_embeddings
    short_wavelen = ctx / scaling.high_freq_factor   # below: high frequencies, unchanged
    long_wavelen = ctx / scaling.low_freq_factor     # above: low frequencies, divided by factor
    wavelen = 2 * math.pi / inv_freq
    slow = inv_freq / scaling.factor
    # interpolation weight: 0 at long_wavelen (fully scaled), 1 at short_wavelen (unscaled)
    smooth = (ctx / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    mixed = (1 - smooth) * slow + smooth * inv_freq
    out = torch.where(wavelen > long_wavelen, slow, inv_freq)
    in_band = (wavelen >= short_wavelen) & (wavelen <= long_wavelen)
    return torch.where(in_band, mixed, out)


def rope_inv_freq(head_dim: int, theta: float = 10000.0,
                  scaling: Optional[Llama3RopeScaling] = None) -> torch.Tensor:
    """The ``head_dim // 2`` inverse frequencies ``theta ** (-2i / head_dim)``, float32."""
    if head_dim % 2 != 0:
        raise ConfigError(f"rotary embedding needs an even head dimension, got {head_dim}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return inv_freq if scaling is None else llama3_scale_inv_freq(inv_freq, scaling)


def rope_table_from_angles(angles: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``(..., 2 * n)`` for rotation angles ``(..., n)`` in the rotate-half
    layout (each angle is used for channel ``i`` and ``i + n``). Any angles work, e.g. a 2-D
    grid: ``cat(row[:, None] * f_row, col[:, None] * f_col, dim=-1)``."""
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rope_1d_table(positions: torch.Tensor, inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``(*positions.shape, 2 * len(inv_freq))`` float32, for integer
    ``positions`` of any shape (``(T,)`` shared by the batch or ``(B, T)`` per row)."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(device=positions.device, dtype=torch.float32)
    return rope_table_from_angles(angles)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` for the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _for_heads(t: torch.Tensor) -> torch.Tensor:
    """Insert the head axis: ``(T, D)`` stays (broadcasts), ``(B, T, D) -> (B, 1, T, D)``."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` and ``k`` of shape ``(B, heads, T, D)`` (the head counts may differ, as with
    grouped-query attention). ``cos``/``sin`` are ``(T, D)``, ``(B, T, D)`` or already
    ``(B, 1, T, D)``; they are cast to the dtype of ``q``."""
    cos, sin = _for_heads(cos).to(q.dtype), _for_heads(sin).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

