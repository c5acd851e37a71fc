"""UM3's next-token losses: Eq. 6's separate softmax and the joint softmax (its ablation).

Eq. 6 (paper Sec. 4.1) normalises a position's logits over the group of its target: over the
text rows ``[0, split)`` when the target is a text token (``<boi>``/``<eoi>`` included), over the
visual rows ``[split, V)`` when it is a visual sub-token. Text and visual logits then never
compete in one softmax (the "logit shift" between modalities it is meant to avoid):

    nll_i = logsumexp(x_i[group(y_i)]) - x_i[y_i]

The joint softmax is the ordinary cross-entropy over all ``V`` rows. Both return per-position
negative log-likelihoods (0 where ``targets == IGNORE``), summed by the caller; the task divides
by the global number of target tokens of the batch.

:func:`head_nll` gives the same values from the final hidden states and the output weight, but
computes logits only where there is a target and, for the split softmax, only over the target's
group. With ~33k visual rows and a tiny model the full ``(B, T, V)`` logits are most of a training
step's time and memory (a 64-wide model: ~10x); the training task uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..quant.bsq import ids_to_group_ids

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


def _group_nll(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``logsumexp(h W^T) - (h W^T)[target]`` per row of ``h`` ``(n, d)``; ``targets`` index rows of ``weight``
    (a cross-entropy: its fused backward is one pass over the logits, a logsumexp's several)."""
    return F.cross_entropy(F.linear(h, weight).float(), targets, reduction="none")


def head_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, split: int,
             softmax: str = "split") -> torch.Tensor:
    """What ``LOSSES[softmax](hidden @ weight.T, targets, split)`` returns (``(...)`` float32, 0 where
    ``targets == IGNORE``), computed at the target positions only: ``hidden`` ``(..., d)`` are the
    final hidden states (the input of the bias-free output layer), ``weight`` ``(V, d)`` its weight."""
    if softmax not in LOSSES:
        raise ValueError(f"softmax must be one of {tuple(LOSSES)}, got {softmax!r}")
    valid = targets != IGNORE
    where = valid.nonzero(as_tuple=True)
    h, t = hidden[where], targets[where]
    if softmax == "joint":
        nll = _group_nll(h, weight, t)
    else:
        text = t < split
        nll = torch.zeros(t.shape, dtype=torch.float32, device=t.device)
        nll = nll.masked_scatter(text, _group_nll(h[text], weight[:split], t[text]))
        nll = nll.masked_scatter(~text, _group_nll(h[~text], weight[split:], t[~text] - split))
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put(where, nll)


def token_layout_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab, chain,
                     softmax: str = "split") -> torch.Tensor:
    """Per-position NLLs ``(...)`` (float32, 0 where ``targets == IGNORE``) in UM3's ``token`` layout
    (:mod:`qlip.um3.vocab`): a target ``>= vocab.visual_start`` is an image token ``visual_start + id``,
    scored as the chain of its sub-tokens (``chain``: :class:`qlip.nn.IntraChain`), factor ``k``
    over group ``k``'s rows of ``weight``; the other targets are text rows. What a position predicts
    next is a text token or an image token's **first** sub-token, so Eq. 6 applies there:

    * ``split``: a text target over the text rows ``[0, visual_start)``, a first sub-token over group
      0's rows;
    * ``joint``: both over the text rows and group 0's rows together (one softmax, the ablation).

    Later sub-tokens are inside the position, where nothing else competes: always over their group."""
    if softmax not in LOSSES:
        raise ValueError(f"softmax must be one of {tuple(LOSSES)}, got {softmax!r}")
    vv = vocab.visual
    start, gs = vocab.visual_start, vv.group_size
    vis = targets >= start
    text = torch.where(vis, torch.full_like(targets, IGNORE), targets)
    first_rows = weight[:start] if softmax == "split" else weight[:start + gs]  # group 0 follows the text rows
    out = head_nll(hidden, first_rows, text, start, "joint")  # one softmax over first_rows
    # no early return without image targets: the chain then gets zero gradients, not none, so
    # every rank reduces the same parameters (DDP / FSDP need that)
    where = vis.nonzero(as_tuple=True)
    sub = ids_to_group_ids(targets[where] - start, vv.bits, vv.group_bits)   # (n, G)

    def logits(k: int, x: torch.Tensor) -> torch.Tensor:
        if k == 0 and softmax == "joint":
            return F.linear(x, first_rows)
        lo = vv.group_start(k)
        return F.linear(x, weight[lo:lo + gs])

    index = sub.clone()
    if softmax == "joint":  # factor 0's target is a row of first_rows
        index[:, 0] += start
    return out.index_put(where, chain.nll(hidden[where], sub, logits, index).float())


def restrict_logits(logits: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``-inf`` outside rows ``[lo, hi)``: sampling in one group, what Eq. 6 trained it to predict."""
    out = torch.full_like(logits, float("-inf"))
    out[..., lo:hi] = logits[..., lo:hi]
    return out
