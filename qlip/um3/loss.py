"""UM3's next-token losses: Eq. 6's separate softmax and the joint softmax (its ablation).

Eq. 6 (paper Sec. 4.1) normalises a position's logits over the group of its target: over the
text rows ``[0, split)`` when the target is a text token (``<boi>``/``<eoi>`` included), over the
visual rows ``[split, V)`` when it is a visual sub-token. Text and visual logits then never
compete in one softmax (the "logit shift" between modalities it is meant to avoid):

    nll_i = logsumexp(x_i[group(y_i)]) - x_i[y_i]

The joint softmax is the ordinary cross-entropy over all ``V`` rows. Both return per-position
negative log-likelihoods (0 where ``targets == IGNORE``), summed by the caller; the task divides
by the global number of target tokens of the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def split_softmax_nll(logits: torch.Tensor, targets: torch.Tensor, split: int) -> torch.Tensor:
    """Eq. 6. ``logits`` ``(..., V)``, ``targets`` ``(...)`` (``IGNORE`` = no loss); float32 result."""
    x = logits.float()
    valid = targets != IGNORE
    t = torch.where(valid, targets, torch.zeros_like(targets))
    lse_text = torch.logsumexp(x[..., :split], dim=-1)
    lse_vis = torch.logsumexp(x[..., split:], dim=-1)
    picked = x.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(t >= split, lse_vis, lse_text) - picked
    return torch.where(valid, nll, torch.zeros_like(nll))


def joint_softmax_nll(logits: torch.Tensor, targets: torch.Tensor, split: int = 0) -> torch.Tensor:
    """The joint softmax over all rows (``split`` unused); same conventions as :func:`split_softmax_nll`."""
    nll = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view(targets.shape)


LOSSES = {"split": split_softmax_nll, "joint": joint_softmax_nll}


def restrict_logits(logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``-inf`` outside rows ``[lo, hi)``: sampling in one group, what Eq. 6 trained it to predict."""
    out = torch.full_like(logits, float("-inf"))
    out[..., lo:hi] = logits[..., lo:hi]
    return out
