"""The vision tower of a QLIP VLM: a frozen QLIP encoder read at one layer (LLaVA-1.5's recipe).

LLaVA-1.5 feeds the language model the patch tokens of the *second-to-last* block of a frozen
CLIP encoder (``hidden_states[-2]``, CLS dropped). QLIP's paper (Section 5.4, Table 6) swaps in
QLIP's encoder the same way and compares three places to read it:

* ``features: hidden``, ``layer: -2`` (default): :meth:`qlip.QLIP.encode_image_features` of the
  second-to-last hidden state, patch tokens only (numbered like transformers' ``hidden_states``:
  0 = embeddings, ``k`` = block ``k``, ``-1`` = the last block; for a one-block encoder ``-2`` is
  the embeddings);
* ``features: hidden``, ``layer: -1``: the last block, before the quantizer;
* ``features: codes``: after the quantizer, the binary codes ``q = sign(u) / sqrt(L)`` (B, N, L)
  whose signs are the image's token bits (what a VLM built on QLIP's discrete tokens would see).

The tower is frozen (no gradients, eval mode) whatever the training stage. It is therefore *not*
part of the VLM's ``state_dict``: the QLIP model is held outside the module tree (moved and cast
with it by :meth:`VisionTower._apply`), its weights are saved once, in the VLM folder's
``vision/`` (qlip's own format), and a resumed training run gets them from the recipe's
``model.qlip`` / ``model.init`` like the first run did. Training checkpoints thus carry no
second copy of a model that never changes.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

FEATURES = ("hidden", "codes")


class VisionTower(nn.Module):
    """``forward(pixel_values) -> (B, N, width)`` features of a frozen QLIP model.

    ``qlip_model``: a :class:`qlip.QLIP` (its text tower and decoder are not used and are dropped
    to save memory); ``layer``: the hidden state read with ``features="hidden"``."""

    def __init__(self, qlip_model: nn.Module, layer: int = -2, features: str = "hidden"):
        super().__init__()
        if features not in FEATURES:
            raise ConfigError(f"vision features must be one of {', '.join(FEATURES)}, got {features!r}")
        depth = qlip_model.config.vision.depth
        if features == "hidden" and not -(depth + 1) <= layer <= depth:  # hidden states: embeddings + blocks
            raise ConfigError(f"vision layer {layer} is out of range for a QLIP encoder with {depth} block(s): "
                              f"{depth + 1} hidden states (0 = embeddings, {depth} = last block; valid "
                              f"{-(depth + 1)}..{depth})")
        if qlip_model.text is not None:
            qlip_model.drop_text()
        # not a registered submodule: kept out of state_dict() / parameters() (module docstring)
        self.__dict__["_qlip"] = qlip_model
        self.layer, self.features = layer, features
        for p in qlip_model.parameters():
            p.requires_grad_(False)
        qlip_model.eval()

    @property
    def qlip(self) -> nn.Module:
        """The frozen QLIP model (not in this module's ``state_dict``)."""
        return self.__dict__["_qlip"]

    def _apply(self, fn, *args, **kwargs):
        """``.to()``, ``.float()``, ``.cuda()``, ... reach the unregistered QLIP model too."""
        self.qlip._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    @property
    def width(self) -> int:
        """Feature width: the encoder's width, or the number of bits L for ``codes``."""
        return self.qlip.num_bits if self.features == "codes" else self.qlip.config.vision.width

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: the patch grid (CLS dropped)."""
        return self.qlip.grid ** 2

    def train(self, mode: bool = True) -> "VisionTower":
        """Always eval: the tower is frozen (a parent's ``.train()`` must not switch it)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.qlip.dtype)
        if self.features == "hidden":
            return self.qlip.encode_image_features(x, layer=self.layer)
        u = self.qlip.image_pass(x, embed=False, until="project").u
        return self.qlip.quantizer.quantize(u)

