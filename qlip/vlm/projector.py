"""The multimodal projector: vision features -> the language model's embedding width.

LLaVA-1.5's ``mlp2x_gelu`` is ``Linear(vision, llm), GELU, Linear(llm, llm)``; LLaVA-1's
``linear`` is one ``Linear(vision, llm)``. Parameters are named ``projector.0`` / ``projector.2``
(an ``nn.Sequential``) as in LLaVA's ``mm_projector``.
"""
from __future__ import annotations

from torch import nn

from ..errors import ConfigError

PROJECTORS = ("mlp2x_gelu", "linear")


def build_projector(kind: str, vision_width: int, llm_width: int) -> nn.Sequential:
    """A fresh projector (PyTorch's default Linear init, as LLaVA)."""
    if kind == "mlp2x_gelu":
        return nn.Sequential(nn.Linear(vision_width, llm_width), nn.GELU(), nn.Linear(llm_width, llm_width))
    if kind == "linear":
        return nn.Sequential(nn.Linear(vision_width, llm_width))
    raise ConfigError(f"projector must be one of {', '.join(PROJECTORS)}, got {kind!r}")
