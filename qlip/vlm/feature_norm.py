"""Fixed normalisation of the frozen vision features before the projector.

A frozen encoder's hidden states need not have the scale a freshly initialised projector
expects. The demo QLIP's ``layer -2`` (its conv stem's output) is tiny and offset: elements of
std ~0.05 around per-channel means up to 0.1, a token norm of ~0.6, the per-image differences
(the shape's colour, where it is) a small fraction of that. A default-initialised
``mlp2x_gelu`` passes such input on as a near-constant vector plus a small signal, and the
random LLM learns position and size from it but hardly colour or kind (docs/vlm.md, "Feature
normalisation"). Three choices (``VLMConfig.feature_norm``):

* ``none``: the features as they are (LLaVA's choice: CLIP's hidden states are well scaled);
* ``layernorm``: a LayerNorm without weights over each token's channels (no statistics to keep);
* ``standardize``: ``(x - mean) / std`` per channel, with ``mean`` and ``std`` measured once on
  training images (:meth:`FeatureNorm.fit`, when a fresh model is built by the training task)
  and then fixed; they are buffers of the VLM (``feature_norm.mean`` / ``feature_norm.std`` in
  ``model.safetensors``), so a saved model answers with exactly the statistics it trained with.

None of them learns anything: the projector stays LLaVA's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

FEATURE_NORMS = ("none", "layernorm", "standardize")


class FeatureNorm(nn.Module):
    """``forward(x (..., width)) -> x`` normalised as ``kind`` says (module docstring)."""

    def __init__(self, kind: str, width: int, eps: float = 1e-6):
        super().__init__()
        if kind not in FEATURE_NORMS:
            raise ConfigError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}, got {kind!r}")
        self.kind, self.width, self.eps = kind, width, eps
        if kind == "standardize":
            self.register_buffer("mean", torch.zeros(width))
            self.register_buffer("std", torch.ones(width))

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        """Set ``mean`` / ``std`` from features (..., width) (every token of every image counts)."""
        if self.kind != "standardize":
            return
        x = features.reshape(-1, self.width).double()
        if x.shape[0] < 2:
            raise ConfigError("feature_norm: standardize needs at least two feature vectors to measure")
        self.mean.copy_(x.mean(0).to(self.mean.dtype))
        self.std.copy_(x.std(0).clamp(min=self.eps).to(self.std.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), eps=self.eps)
        if self.kind == "standardize":
            return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def extra_repr(self) -> str:
        return f"{self.kind}, width={self.width}"
