"""Code statistics of BSQ token ids, and the paper's bit budget numbers.

Token ids are int64 in ``[0, 2**L)``; bit ``i`` (channel ``i`` of the quantiser, ``i = 0..L-1``) is
``(id >> (L - 1 - i)) & 1``: channel 0 is the most significant bit, as in the official ``bsq.py``.
A "group" of ``g`` bits is the integer made by bits ``j*g .. j*g+g-1`` (group 0 holds the most
significant bits), the factorisation the downstream models use (e.g. 28 = 2 x 14).

:class:`CodeStats` accumulates over batches (``update(ids)``) and reports (``compute()``):

* ``distinct_codes``: number of distinct ids seen;
* ``code_usage``: ``distinct_codes / min(2**L, n_tokens)`` (1.0 = every possible or every
  observed token slot used a different code);
* ``code_entropy``: empirical entropy (bits) of the id histogram; its maximum is
  ``log2(min(2**L, n_tokens))``;
* ``bit_p1``: P(bit_i = 1) per bit (bit balance; 0.5 is balanced), ``bit_entropy``: the binary
  entropy of each (1.0 is maximal), ``bit_entropy_mean``;
* ``group_entropy``: entropy (bits) of each group's id histogram (max ``g``), its mean, and
  ``group_usage`` = distinct group ids / min(2**g, n_tokens).

Paper numbers (Tables 2 and 14): ``compression_ratio(p, L) = 24 * p**2 / L`` (24 bits of RGB
per pixel over L bits per p x p patch; 219.4 for p=16, L=28) and ``bits_per_image = L * (H/p) *
(W/p)``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

from qlip.errors import QLIPError
from qlip.quant import ids_to_bits, ids_to_group_ids  # noqa: F401 (ids_to_bits re-exported)

Size = Union[int, Sequence[int]]


def compression_ratio(patch_size: int, num_bits: int) -> float:
    """Paper's compression ratio: 24 bits per RGB pixel x p^2 pixels / L bits per token."""
    if patch_size < 1 or num_bits < 1:
        raise QLIPError(f"patch size and bit count must be positive (got {patch_size}, {num_bits})")
    return 24.0 * patch_size**2 / num_bits


def _hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def bits_per_image(image_size: Size, patch_size: int, num_bits: int) -> int:
    """Bits to store one image's tokens: L * (H/p) * (W/p)."""
    h, w = _hw(image_size)
    if h % patch_size or w % patch_size:
        raise QLIPError(f"image size {h}x{w} is not a multiple of the patch size {patch_size}")
    return num_bits * (h // patch_size) * (w // patch_size)


def ids_to_groups(ids: torch.Tensor, num_bits: int, group_size: int) -> torch.Tensor:
    """(...,) ids -> (..., L/g) group ids; group 0 holds the most significant ``g`` bits
    (the shared conversion of ``qlip.quant``, with a one-line error for a bad group size)."""
    if num_bits % group_size:
        raise QLIPError(f"group size {group_size} does not divide the {num_bits} bits")
    return ids_to_group_ids(ids, num_bits, group_size)


def default_group_size(num_bits: int) -> int:
    """The largest divisor of L that is at most 16 (14 for L = 28)."""
    return max(g for g in range(1, min(num_bits, 16) + 1) if num_bits % g == 0)


def _entropy_bits(counts: np.ndarray) -> float:
    counts = counts[counts > 0].astype(np.float64)
    if counts.size == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    return np.nan_to_num(h, nan=0.0)


class CodeStats:
    """Streaming statistics of token ids; ``update(ids)`` per batch, ``compute()`` at the end.

    Memory: the id histogram holds one (id, count) pair per distinct id seen (at most the number
    of tokens); pending batches are merged every ``merge_every`` tokens.
    """

    def __init__(self, num_bits: int, group_size: Optional[int] = None, merge_every: int = 1 << 22) -> None:
        if not 1 <= num_bits <= 62:
            raise QLIPError(f"number of bits must be in 1..62, got {num_bits}")
        self.num_bits = num_bits
        self.group_size = default_group_size(num_bits) if group_size is None else group_size
        if self.group_size < 1 or num_bits % self.group_size or self.group_size > 16:
            raise QLIPError(f"group size {self.group_size} must divide {num_bits} and be at most 16")
        self.merge_every = merge_every
        self.n_tokens = 0
        self.bit_ones = np.zeros(num_bits, dtype=np.int64)
        self.group_counts = np.zeros((num_bits // self.group_size, 1 << self.group_size), dtype=np.int64)
        self._values = np.zeros(0, dtype=np.int64)
        self._counts = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def update(self, ids: torch.Tensor) -> None:
        """Add a batch of token ids (any shape, int64, values in [0, 2**L))."""
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.numel() == 0:
            return
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise QLIPError(f"token ids must be integers, got {ids.dtype}")
        ids = ids.to(torch.int64)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= (1 << self.num_bits):
            raise QLIPError(f"token id out of range [0, 2**{self.num_bits}): saw {lo if lo < 0 else hi}")
        self.n_tokens += ids.numel()
        self.bit_ones += ids_to_bits(ids, self.num_bits).sum(dim=0).cpu().numpy()
        groups = ids_to_groups(ids, self.num_bits, self.group_size).cpu()
        for j in range(groups.shape[1]):
            self.group_counts[j] += torch.bincount(groups[:, j], minlength=1 << self.group_size).numpy()
        values, counts = torch.unique(ids.cpu(), return_counts=True)
        self._pending.append((values.numpy(), counts.numpy()))
        self._pending_size += len(values)
        if self._pending_size >= self.merge_every:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        values = np.concatenate([self._values] + [v for v, _ in self._pending])
        counts = np.concatenate([self._counts] + [c for _, c in self._pending])
        uniq, inverse = np.unique(values, return_inverse=True)
        self._values = uniq
        self._counts = np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def compute(self) -> dict:
        """All statistics as plain Python numbers / lists (see the module docstring)."""
        if self.n_tokens == 0:
            raise QLIPError("no token ids were given to the code statistics")
        self._merge()
        L, g, n = self.num_bits, self.group_size, self.n_tokens
        p1 = self.bit_ones / n
        bit_h = _binary_entropy(p1)
        group_h = [_entropy_bits(c) for c in self.group_counts]
        distinct = int(len(self._values))
        return {
            "num_bits": L,
            "n_tokens": n,
            "distinct_codes": distinct,
            "code_usage": distinct / min(2**L, n),
            "code_entropy": _entropy_bits(self._counts),
            "code_entropy_max": math.log2(min(2**L, n)),
            "bit_p1": p1.tolist(),
            "bit_entropy": bit_h.tolist(),
            "bit_entropy_mean": float(bit_h.mean()),
            "bit_balance_max_dev": float(np.abs(p1 - 0.5).max()),
            "group_size": g,
            "group_entropy": group_h,
            "group_entropy_mean": float(np.mean(group_h)),
            "group_usage": [int((c > 0).sum()) / min(2**g, n) for c in self.group_counts],
        }


def code_stats(ids: torch.Tensor, num_bits: int, group_size: Optional[int] = None) -> dict:
    """One-shot :class:`CodeStats` of a tensor of ids."""
    stats = CodeStats(num_bits, group_size)
    stats.update(ids)
    return stats.compute()


@torch.no_grad()
def run_codes(model, dataset, *, batch_size: int = 32, limit: Optional[int] = None,
              group_size: Optional[int] = None, progress: bool = True) -> dict:
    """Code statistics of ``model.tokenize`` over a dataset, plus the paper's bit budget."""
    from tqdm.auto import tqdm

    from qlip.eval.common import model_device

    device = model_device(model)
    stats = CodeStats(int(model.num_bits), group_size)
    for images, _ in tqdm(dataset.batches(model.preprocess, batch_size, limit), desc="codes",
                          disable=not progress, leave=False):
        stats.update(model.tokenize(images.to(device)))
    out = stats.compute()
    out.update(budget(model))
    return out


def budget(model) -> dict:
    """``num_bits``, ``compression_ratio`` and ``bits_per_image`` of a model (paper's columns)."""
    L, p = int(model.num_bits), int(model.patch_size)
    return {
        "num_bits": L,
        "patch_size": p,
        "image_size": model.image_size,
        "compression_ratio": compression_ratio(p, L),
        "bits_per_image": bits_per_image(model.image_size, p, L),
    }
