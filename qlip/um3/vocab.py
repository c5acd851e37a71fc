"""UM3's vocabulary: the text rows of the starting Llama, ``<boi>`` / ``<eoi>``, then the visual rows.

    rows [0, text_size)                     the Llama's own token embedding rows (tokenizer ids)
    row  text_size                          <boi>  (begin of image)
    row  text_size + 1                      <eoi>  (end of image)
    rows [visual_start, visual_start + V_v) visual sub-tokens (qlip.quant.VisualVocab, 2 x 2**14
                                            rows for 28-bit QLIP ids, group 0 = high bits)

Eq. 6's two softmax groups are ``[0, visual_start)`` ("text", the special tokens included: they
are predicted at text positions) and ``[visual_start, size)`` ("visual"). An image of ``N`` QLIP
tokens is ``<boi>``, ``N * groups`` sub-tokens (token0.g0, token0.g1, token1.g0, ...), ``<eoi>``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping

import torch

from ..errors import ConfigError
from ..quant import VisualVocab


@dataclass(frozen=True)
class UM3Vocab:
    text_size: int          # rows of the starting model's embedding (Llama 3: 128,256)
    bits: int = 28          # QLIP token bits
    groups: int = 2         # sub-tokens per QLIP token (2 x 14 bits)

    def __post_init__(self):
        if self.text_size < 1:
            raise ConfigError(f"UM3Vocab.text_size must be >= 1, got {self.text_size}")
        self.visual  # validates bits / groups (DataError from VisualVocab) early

    @property
    def boi(self) -> int:
        return self.text_size

    @property
    def eoi(self) -> int:
        return self.text_size + 1

    @property
    def visual_start(self) -> int:
        """First visual row; also the size of Eq. 6's text group."""
        return self.text_size + 2

    @property
    def visual(self) -> VisualVocab:
        return VisualVocab(bits=self.bits, groups=self.groups, offset=self.visual_start, shared=False)

    @property
    def size(self) -> int:
        """Rows of the extended embedding and output layer."""
        return self.visual.end

    @property
    def added(self) -> int:
        """Rows added to the starting model (``<boi>``, ``<eoi>`` and the visual rows)."""
        return self.size - self.text_size

    def is_visual(self, rows: torch.Tensor) -> torch.Tensor:
        return rows >= self.visual_start

    def image_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """QLIP ids ``(B, N)`` or ``(B, h, w)`` -> ``(B, N * groups)`` rows (no ``<boi>``/``<eoi>``)."""
        return self.visual.encode(ids)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UM3Vocab":
        return cls(**{k: d[k] for k in ("text_size", "bits", "groups")})
