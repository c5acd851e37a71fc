"""The multimodal projector: vision features -> the language model's embedding width.

LLaVA-1.5's ``mlp2x_gelu`` is ``Linear(vision, llm), GELU, Linear(llm, llm)``; LLaVA-1's
``linear`` is one ``Linear(vision, llm)``. Parameters are named ``projector.0`` / ``projector.2``
(an ``nn.Sequential``) as in LLaVA's ``mm_projector``.

``token_merge: k`` (default 1: LLaVA-1.5, every patch token its own LLM position) first
concatenates the features of each k x k block of neighbouring patches (:func:`merge_tokens`,
the 2 x 2 merger of Qwen2-VL / the pixel shuffle of Idefics3 and InternVL): k^2 fewer image
positions, each projected from a k x k region, so the projector sees local shape and the LLM has
fewer positions to assemble an object from.
"""
from __future__ import annotations

import torch
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


def merge_tokens(feats: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N, C) patch tokens of a square, row-major grid -> (B, N / k^2, k^2 C): each output token
    concatenates a k x k block of neighbours (row-major within the block), blocks in row-major order."""
    if k == 1:
        return feats
    b, n, c = feats.shape
    g = int(round(n ** 0.5))
    if g * g != n or g % k:
        raise ConfigError(f"token_merge {k} needs a square patch grid divisible by {k}, got {n} tokens")
    x = feats.reshape(b, g // k, k, g // k, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (g // k) ** 2, k * k * c)
