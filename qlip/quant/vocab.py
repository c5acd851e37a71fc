"""Visual-token vocabulary: 28-bit ids as sub-tokens for a language model.

A QLIP token id has ``bits`` (28) bits: ``2 ** 28`` values is far too many rows for an embedding
table or an output softmax. Downstream models therefore see each id as ``G`` sub-tokens of
``bits / G`` bits (default 2 x 14: ``2 * 16384`` rows instead of ``2 ** 28``), most significant
group first, exactly as :func:`qlip.quant.bsq.ids_to_group_ids` splits them:

    id = 0b 1011...(14 bits)  0110...(14 bits)
            └── group 0 ───┘  └── group 1 ───┘      sub = (group 0 value, group 1 value)

``to_vocab`` maps the sub-tokens into rows of an extended vocabulary that starts at ``offset``
(e.g. the size of a text vocabulary):

* ``shared=False`` (default): each group position has its own ``2 ** (bits / G)`` rows,
  ``row = offset + g * 2 ** (bits / G) + value``. The model knows from the row alone whether it
  is reading a high or a low half, and an output head can restrict the softmax to the rows of the
  position it predicts. ``size = G * 2 ** (bits / G)``.
* ``shared=True``: all groups share one block of rows, ``row = offset + value``
  (``size = 2 ** (bits / G)``). Fewer rows; the position of a sub-token in the sequence
  (token0.g0, token0.g1, ...) is then the only thing that tells its group.

A sequence of ``N`` image tokens becomes ``N * G`` sub-tokens in the order
``token0.g0, token0.g1, ..., token1.g0, ...`` (:meth:`VisualVocab.encode` / :meth:`decode`).

    vocab = VisualVocab(bits=28, groups=2, offset=len(text_tokenizer))
    seq = vocab.encode(model.tokenize(x))        # (B, h*w*2) rows for the LM embedding
    ids = vocab.decode(seq)                      # (B, h*w) exact int64 ids -> model.detokenize

All functions are exact integer arithmetic on int64 tensors (numpy arrays are accepted and
converted); out-of-range inputs raise :class:`qlip.errors.DataError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch

from ..errors import DataError
from .bsq import check_ids, group_ids_to_ids, ids_to_group_ids

Array = Union[torch.Tensor, np.ndarray]


def _as_int_tensor(x: Array, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise DataError(f"{what} must be an integer array, got dtype {t.dtype}")
    return t.to(torch.int64)


@dataclass(frozen=True)
class VisualVocab:
    """``bits``-bit token ids <-> ``groups`` sub-tokens <-> rows ``[offset, offset + size)``.

    ``bits`` must be divisible by ``groups``; each group holds ``group_bits = bits // groups``
    bits (at most 31, so that a row fits in the int32 of common token files).
    """

    bits: int = 28
    groups: int = 2
    offset: int = 0
    shared: bool = False

    def __post_init__(self):
        if not 1 <= self.bits <= 62:
            raise DataError(f"bits must be in [1, 62], got {self.bits}")
        if self.groups < 1 or self.bits % self.groups:
            raise DataError(f"bits ({self.bits}) must be divisible by groups ({self.groups}); "
                            f"valid group counts: {[g for g in range(1, self.bits + 1) if self.bits % g == 0]}")
        if self.group_bits > 31:
            raise DataError(f"{self.bits} bits in {self.groups} group(s) gives {self.group_bits}-bit "
                            "sub-tokens; use more groups (at most 31 bits per sub-token)")
        if self.offset < 0:
            raise DataError(f"offset must be >= 0, got {self.offset}")

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def group_bits(self) -> int:
        """Bits per sub-token (``bits / groups``)."""
        return self.bits // self.groups

    @property
    def group_size(self) -> int:
        """Values per sub-token, ``2 ** group_bits``."""
        return 1 << self.group_bits

    @property
    def size(self) -> int:
        """Rows this vocabulary adds after ``offset``."""
        return self.group_size * (1 if self.shared else self.groups)

    @property
    def end(self) -> int:
        """One past the last visual row: rows are ``[offset, end)``."""
        return self.offset + self.size

    def group_start(self, g: int) -> int:
        """First row of group ``g`` (the same row for every group when ``shared``)."""
        if not 0 <= g < self.groups:
            raise DataError(f"group {g} is not in [0, {self.groups})")
        return self.offset + (0 if self.shared else g * self.group_size)

    # ---- ids <-> sub-token values ------------------------------------------------------------
    def split(self, ids: Array) -> torch.Tensor:
        """``(...)`` ids in ``[0, 2**bits)`` -> ``(..., G)`` values in ``[0, 2**group_bits)``,
        group 0 = the most significant bits (as :func:`ids_to_group_ids`)."""
        ids = _as_int_tensor(ids, "token ids")
        check_ids(ids, self.bits, "token ids")
        return ids_to_group_ids(ids, self.bits, self.group_bits)

    def merge(self, sub: Array) -> torch.Tensor:
        """``(..., G)`` sub-token values -> ``(...)`` exact int64 ids (inverse of :meth:`split`)."""
        sub = _as_int_tensor(sub, "sub-token values")
        self._check_groups(sub, "sub-token values")
        check_ids(sub, self.group_bits, "sub-token values")
        return group_ids_to_ids(sub, self.group_bits)

    # ---- ids <-> vocabulary rows -------------------------------------------------------------
    def _row_starts(self, device: torch.device) -> torch.Tensor:
        return self.offset + torch.arange(self.groups, device=device, dtype=torch.int64) * (
            0 if self.shared else self.group_size)

    def to_vocab(self, ids: Array) -> torch.Tensor:
        """``(...)`` ids -> ``(..., G)`` rows of the extended vocabulary."""
        sub = self.split(ids)
        return sub + self._row_starts(sub.device)

    def from_vocab(self, rows: Array) -> torch.Tensor:
        """``(..., G)`` rows -> ``(...)`` ids. Raises DataError for rows outside the visual range
        ``[offset, end)`` and, unless ``shared``, for a row of group g' at group position g."""
        rows = _as_int_tensor(rows, "vocabulary ids")
        self._check_groups(rows, "vocabulary ids")
        if rows.numel():
            lo, hi = int(rows.min()), int(rows.max())
            if lo < self.offset or hi >= self.end:
                raise DataError(f"vocabulary ids must be visual tokens in [{self.offset}, {self.end}), "
                                f"found values in [{lo}, {hi}] (text tokens or another vocabulary?)")
        sub = rows - self._row_starts(rows.device)
        if not self.shared and sub.numel():
            bad = (sub < 0) | (sub >= self.group_size)
            if bool(bad.any()):
                g = int(bad.nonzero()[0, -1])
                raise DataError(f"vocabulary id {int(rows[bad][0])} at group position {g} is not a row of "
                                f"group {g} [{self.group_start(g)}, {self.group_start(g) + self.group_size}): "
                                "sub-tokens out of order")
        return group_ids_to_ids(sub, self.group_bits)

    # ---- (B, N, G) <-> (B, N * G) sequences ----------------------------------------------------
    def flatten(self, x: Array) -> torch.Tensor:
        """``(..., N, G)`` -> ``(..., N * G)`` in the order token0.g0, token0.g1, token1.g0, ..."""
        x = torch.as_tensor(x)
        self._check_groups(x, "sub-tokens")
        if x.dim() < 2:
            raise DataError(f"flatten expects (..., N, {self.groups}), got shape {tuple(x.shape)}")
        return x.flatten(-2)

    def unflatten(self, seq: Array) -> torch.Tensor:
        """``(..., N * G)`` -> ``(..., N, G)`` (inverse of :meth:`flatten`)."""
        seq = torch.as_tensor(seq)
        if seq.dim() < 1 or seq.shape[-1] % self.groups:
            raise DataError(f"a sub-token sequence must have a length divisible by {self.groups} "
                            f"groups, got shape {tuple(seq.shape)}")
        return seq.unflatten(-1, (seq.shape[-1] // self.groups, self.groups))

    def encode(self, ids: Array) -> torch.Tensor:
        """Image ids ``(B, N)`` or ``(B, h, w)`` -> vocabulary rows ``(B, N * G)``."""
        rows = self.to_vocab(ids)
        if rows.dim() > 3:  # (B, h, w, G) -> (B, h*w, G)
            rows = rows.flatten(1, -2)
        return self.flatten(rows)

    def decode(self, seq: Array) -> torch.Tensor:
        """Vocabulary rows ``(..., N * G)`` -> ids ``(..., N)`` (reshape to ``(B, h, w)`` to detokenize)."""
        return self.from_vocab(self.unflatten(seq))

    def _check_groups(self, x: torch.Tensor, what: str) -> None:
        if x.dim() < 1 or x.shape[-1] != self.groups:
            raise DataError(f"{what} must have a last dimension of {self.groups} groups, got shape {tuple(x.shape)}")
