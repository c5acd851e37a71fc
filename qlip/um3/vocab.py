"""UM3's vocabulary: the text rows of the starting Llama, ``<boi>`` / ``<eoi>``, then the visual rows.

    rows [0, text_size)                     the Llama's own token embedding rows (tokenizer ids)
    row  text_size                          <boi>  (begin of image)
    row  text_size + 1                      <eoi>  (end of image)
    rows [visual_start, visual_start + V_v) visual sub-tokens (qlip.quant.VisualVocab, 2 x 2**14
                                            rows for 28-bit QLIP ids, group 0 = high bits)

Eq. 6's two softmax groups are ``[0, visual_start)`` ("text", the special tokens included: they
are predicted at text positions) and ``[visual_start, size)`` ("visual").

**Layouts** (how an image of ``N`` QLIP tokens sits in the sequence):

* ``subtoken`` (the paper's, default): ``<boi>``, ``N * groups`` sub-tokens (token0.g0, token0.g1,
  token1.g0, ...), ``<eoi>``; every sequence entry is a row of the embedding;
* ``token`` (ours, opt-in): ``<boi>``, ``N`` entries, ``<eoi>``: one position per QLIP token. Its
  entry is ``visual_start + id`` (the 28-bit id itself, offset; not a row index): the model reads
  the sum of the token's ``groups`` sub-token rows and predicts the sub-tokens one after another
  from that position's state (:class:`qlip.um3.model.UM3`, the ``intra`` head of
  :mod:`qlip.gen.heads`). Images are ``groups`` times shorter (docs/um3.md says why).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping

import torch

from ..errors import ConfigError
from ..quant import VisualVocab

LAYOUTS = ("subtoken", "token")


@dataclass(frozen=True)
class UM3Vocab:
    text_size: int          # rows of the starting model's embedding (Llama 3: 128,256)
    bits: int = 28          # QLIP token bits
    groups: int = 2         # sub-tokens per QLIP token (2 x 14 bits)
    layout: str = "subtoken"  # subtoken: one position per sub-token (paper) | token: one per QLIP token (ours)

    def __post_init__(self):
        if self.text_size < 1:
            raise ConfigError(f"UM3Vocab.text_size must be >= 1, got {self.text_size}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"UM3Vocab.layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
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

    @property
    def per_token(self) -> int:
        """Sequence positions per QLIP token: ``groups`` (``subtoken``) or 1 (``token``)."""
        return 1 if self.layout == "token" else self.groups

    def image_seq(self, ids: torch.Tensor) -> torch.Tensor:
        """QLIP ids ``(B, N)`` or ``(B, h, w)`` -> the image's sequence entries ``(B, N * per_token)``
        (no ``<boi>``/``<eoi>``): sub-token rows, or ``visual_start + id`` in the ``token`` layout."""
        if self.layout == "subtoken":
            return self.visual.encode(ids)
        ids = torch.as_tensor(ids)
        self.visual.split(ids)  # the range check (a DataError naming the bits)
        return ids.reshape(ids.shape[0], -1).long() + self.visual_start

    def image_ids(self, seq: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`image_seq`: ``(B, N * per_token)`` -> QLIP ids ``(B, N)``."""
        if self.layout == "subtoken":
            return self.visual.decode(seq)
        return torch.as_tensor(seq).long() - self.visual_start

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UM3Vocab":
        return cls(**{k: d[k] for k in ("text_size", "bits", "groups")}, layout=d.get("layout", "subtoken"))
