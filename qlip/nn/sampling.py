"""Next-token sampling from logits: temperature, top-k, top-p (nucleus), classifier-free guidance.

Everything works on logits of shape ``(..., V)`` (any leading batch dims) and is batched.
:func:`sample` applies, in this order (as Hugging Face ``generate``): temperature, top-k, top-p,
then draws one id per row from the softmax; ``temperature == 0`` is greedy (argmax, top-k/top-p
have no effect). Filtered-out tokens get logit ``-inf``.

Classifier-free guidance (:func:`cfg_logits`) is combined on *logits*, as in LlamaGen:
``uncond + scale * (cond - uncond)``; scale 1 is the conditional model, 0 the unconditional one.
It runs before temperature / top-k / top-p.
"""
from __future__ import annotations

from typing import Optional

import torch


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits: ``uncond + scale * (cond - uncond)``. Where both logits
    are equal (e.g. ``-inf`` at a token masked in both) the result is that value, not NaN."""
    mixed = uncond + scale * (cond - uncond)
    return torch.where(cond == uncond, cond, mixed)


def top_k_filter(logits: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits of each row (ties broken by ``torch.topk``), the rest
    ``-inf``. ``k`` of ``None`` or ``0`` disables the filter; ``k >= V`` keeps everything."""
    if not k or k >= logits.shape[-1]:
        return logits
    if k < 0:
        raise ValueError(f"top_k must be >= 0, got {k}")
    idx = logits.topk(k, dim=-1).indices
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, idx, True)
    return logits.masked_fill(~keep, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: Optional[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to at
    least ``p`` (always at least the most likely token), the rest ``-inf``. ``p`` of ``None`` or
    ``>= 1`` disables the filter."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs          # probability of the more likely tokens
    drop_sorted = mass_before >= p                      # the nucleus is already complete
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
           top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token id per row of ``logits`` ``(..., V)``; returns ``(...)`` int64 ids.
    ``generator`` (on the logits' device) makes the draw reproducible."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    probs = logits.softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, num_samples=1, generator=generator)
    return ids.view(probs.shape[:-1])
