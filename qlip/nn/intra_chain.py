"""The in-position chain of sub-tokens: a token's ``G`` sub-tokens predicted one after another
from one sequence position's state (Open-MAGVIT2's "factorized" prediction, extended to ``G``).

Shared by the text-to-image ``intra`` head (:mod:`qlip.gen.heads`) and UM3's ``token`` layout
(:mod:`qlip.um3.model`); with it the two helpers of guided per-factor sampling.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .rmsnorm import RMSNorm
from .sampling import cfg_logits, sample


def guide(cond: torch.Tensor, uncond: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Guided logits; ``uncond is None`` or ``scale == 1`` is the conditional model itself."""
    if uncond is None or scale == 1.0:
        return cond
    return cfg_logits(cond, uncond, scale)


def paired_logits(logits_fn, h_cond: torch.Tensor, h_uncond: Optional[torch.Tensor], *extra: torch.Tensor):
    """``(logits_fn(h_cond, *extra), logits_fn(h_uncond, *extra))`` from one call on the stacked
    rows (``None`` for the second without ``h_uncond``): one read of the output weights, not two."""
    if h_uncond is None:
        return logits_fn(h_cond, *extra), None
    both = logits_fn(torch.cat([h_cond, h_uncond]), *(torch.cat([e, e]) for e in extra))
    return both[:h_cond.shape[0]], both[h_cond.shape[0]:]


class IntraChain(nn.Module):
    """The in-position chain of sub-tokens (Open-MAGVIT2's "factorized" prediction, extended from
    two halves to ``groups`` sub-tokens): ``p(s_0 | h) p(s_1 | h, s_0) ... p(s_{G-1} | h, s_0 .. s_{G-2})``.

    Factor ``k`` reads the context ``c_k = h + sum_{j<k} P_j(s_j)`` (``P_j``: ``prev[j]``, one
    embedding table per earlier sub-token) through a small residual MLP,
    ``x_k = c_k + MLP_k(norm_k(c_k))`` (``x_0 = h``); its logits are ``logits_fn(k, x_k)``, supplied
    by the owner of the output rows (:class:`qlip.gen.heads.IntraTokenHead`'s own tables, or the
    rows of UM3's output layer in its ``token`` layout: :class:`qlip.um3.model.UM3`). Training uses the true
    sub-tokens (teacher forcing), so :meth:`nll` is the exact NLL of the whole id; :meth:`sample`
    draws ``s_0`` first."""

    def __init__(self, dim: int, groups: int, group_size: int):
        super().__init__()
        self.groups = groups
        self.prev = nn.ModuleList([nn.Embedding(group_size, dim) for _ in range(groups - 1)])
        self.norms = nn.ModuleList([RMSNorm(dim) for _ in range(groups - 1)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"),
                                                 nn.Linear(2 * dim, dim)) for _ in range(groups - 1)])

    def features(self, k: int, c: torch.Tensor) -> torch.Tensor:
        """``x_k`` from the context ``c_k`` (the input of factor ``k``'s output rows)."""
        return c if k == 0 else c + self.mlps[k - 1](self.norms[k - 1](c))

    def context(self, k: int, hidden: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """``c_k = hidden + sum_{j<k} P_j(prev[..., j])`` (columns of ``prev`` from ``k`` on unused)."""
        c = hidden
        for j in range(k):
            c = c + self.prev[j](prev[..., j])
        return c

    def nll(self, hidden: torch.Tensor, sub: torch.Tensor, logits_fn, targets: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
        """Summed NLL of the sub-tokens ``sub`` ``(..., G)`` given ``hidden`` ``(..., dim)``;
        ``targets`` (default ``sub``): the index each factor's target has in ``logits_fn``'s rows."""
        targets = sub if targets is None else targets
        c, total = hidden, 0
        for k in range(self.groups):  # the context grows by one sub-token embedding per factor
            logp = logits_fn(k, self.features(k, c)).float().log_softmax(-1)
            total = total - logp.gather(-1, targets[..., k:k + 1])[..., 0]
            if k + 1 < self.groups:
                c = c + self.prev[k](sub[..., k])
        return total

    def sample(self, logits_fn, h_cond: torch.Tensor, h_uncond: Optional[torch.Tensor] = None, cfg: float = 1.0,
               temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Sub-tokens ``(B, G)`` drawn one after another from ``h_cond`` ``(B, dim)``, each factor guided
        against ``h_uncond`` with ``cfg`` (the same earlier sub-tokens in both branches); ``logits_fn``
        gets a few rows (sampling)."""
        cc, cu, subs = h_cond, h_uncond, []  # each branch's context, given the same earlier sub-tokens
        for k in range(self.groups):
            lc, lu = paired_logits(lambda c: logits_fn(k, self.features(k, c)), cc, cu)
            subs.append(sample(guide(lc, lu, cfg), temperature, top_k, top_p, generator))
            if k + 1 < self.groups:
                e = self.prev[k](subs[-1])
                cc, cu = cc + e, (None if cu is None else cu + e)
        return torch.stack(subs, -1)
