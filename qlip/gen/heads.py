"""Visual heads: how a generator reads and predicts ``bits``-bit QLIP token ids.

A 28-bit id cannot be one flat vocabulary (``2**28`` output rows). Each head below owns both ends
of the problem: the **input embedding** of an id (what the transformer reads at the next
position) and the **output distribution** over ids given a hidden state (loss and sampling).

===========  ================================================================  ======================
kind         output                                                            input embedding
===========  ================================================================  ======================
``split``    ``G`` parallel ``2**(bits/G)``-way softmaxes (MAGVIT-v2; default   sum of the ``G``
             2 x 16,384): the sub-tokens are independent given the hidden       sub-token embeddings
``bitwise``  ``bits`` binary classifiers (Infinity's bitwise head)              ``Linear`` on the +-1
                                                                                code vector
``intra``    the ``G`` sub-tokens one after another inside the position      sum of the ``G``
             (Open-MAGVIT2's "factorized" prediction, default 2 halves):        sub-token embeddings
             ``p(s_0) p(s_1|s_0) ...``
===========  ================================================================  ======================

**Losses** are the negative log-likelihood of the whole id in nats per image token, for every
head (the sum of the factors' cross-entropies, e.g. 28 bit cross-entropies for ``bitwise``), so
the three heads' losses are directly comparable.

**Classifier-free guidance** is applied per factor, on logits (``qlip.nn.cfg_logits``):
``l_u + s (l_c - l_u)`` renormalised. For ``split`` and ``bitwise`` this is *exactly* guidance on
the joint distribution: with ``p(x) = prod_g p_g(x_g)`` for the conditional and the unconditional
model, ``p_c(x)^s p_u(x)^(1-s) = prod_g p_c,g(x_g)^s p_u,g(x_g)^(1-s)``, and each factor's
normaliser is a constant, so normalising per head normalises the product. For ``intra`` a later
sub-token's normaliser depends on the sampled earlier ones, so per-step guidance (``s_0`` guided,
then ``s_1 | s_0`` guided with the same ``s_0`` in both branches, ...) is the same approximation an
autoregressive model makes across positions, not the guided joint. Top-k / top-p also act per
factor (per sub-token, or per bit where only ``top_k=1`` and ``top_p`` matter).

**Sampling speed.** A decoding step at small batch is bound by reading the output weights (the
``split`` head's two 16,384-row tables are most of a small generator's weights). So, when
sampling: the conditional and the unconditional hidden states go through each output layer in
**one** call (:func:`_paired_logits`), not two; the few rows are multiplied as ``W @ h^T``
(:func:`_few_rows_linear`: on CPUs a skinny ``(16384, C) x (C, B)`` product streams the weight
once, where ``h @ W^T`` with ``B`` of 1-32 runs at a fraction of the speed); sampled sub-tokens
are merged without the range checks of :class:`qlip.quant.VisualVocab` (in range by
construction; the checks read the tensor back, a device sync per step on a GPU). Cached and
uncached sampling share this code, so they still draw the same tokens.

Ids are MSB-first (as ``qlip.quant.VisualVocab`` and the official ``bsq.py``): sub-token 0 /
bit 0 is the most significant.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import IntraChain, sample
from ..nn.intra_chain import guide as _guide, paired_logits as _paired_logits
from ..quant import VisualVocab
from ..quant.bsq import group_ids_to_ids, ids_to_group_ids

HEAD_KINDS = ("split", "bitwise", "intra")


def _few_rows_linear(layer: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """``layer(h)`` for a few rows ``h`` ``(B, dim)`` computed as ``(W @ h^T)^T`` (same values up to
    float rounding; about 2x faster than ``F.linear`` on a CPU for a 16,384-row ``W`` and ``B <= 32``)."""
    out = (layer.weight @ h.to(layer.weight.dtype).T).T
    return out if layer.bias is None else out + layer.bias


class VisualHead(nn.Module):
    """Base class. ``embed(ids)``: ``(B, N)`` ids -> ``(B, N, dim)``; ``loss(hidden, ids)``: mean
    NLL per token in nats; ``sample(h_cond, h_uncond, ...)``: ``(B, dim)`` hidden states -> ``(B,)``
    ids (``h_uncond`` given: classifier-free guidance with ``cfg``)."""

    kind = ""

    def __init__(self, dim: int, bits: int):
        super().__init__()
        self.dim, self.bits = dim, bits

    def embed(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """``check=False`` skips the id range check (ids the head itself sampled)."""
        raise NotImplementedError

    def nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Per-token NLL ``(B, N)`` of ``ids`` ``(B, N)`` given ``hidden`` ``(B, N, dim)``."""
        raise NotImplementedError

    def loss(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.nll(hidden, ids).mean()

    def sample(self, h_cond: torch.Tensor, h_uncond: Optional[torch.Tensor] = None, cfg: float = 1.0,
               temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        raise NotImplementedError


class SplitHead(VisualHead):
    """``groups`` parallel softmaxes over ``bits / groups``-bit sub-tokens (default 2 x 14 bits)."""

    kind = "split"

    def __init__(self, dim: int, bits: int = 28, groups: int = 2):
        super().__init__(dim, bits)
        self.vocab = VisualVocab(bits=bits, groups=groups)
        V = self.vocab.group_size
        self.embeddings = nn.ModuleList([nn.Embedding(V, dim) for _ in range(groups)])
        self.outputs = nn.ModuleList([nn.Linear(dim, V, bias=False) for _ in range(groups)])

    def embed(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        sub = self.vocab.split(ids).to(ids.device) if check else ids_to_group_ids(ids, self.bits, self.vocab.group_bits)
        return sum(e(sub[..., g]) for g, e in enumerate(self.embeddings))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` -> ``(..., G, 2**(bits/G))`` float32 logits."""
        return torch.stack([o(hidden).float() for o in self.outputs], dim=-2)

    def step_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """:meth:`logits` of a few rows ``(B, dim)`` for sampling (:func:`_few_rows_linear`)."""
        return torch.stack([_few_rows_linear(o, hidden).float() for o in self.outputs], dim=-2)

    def nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        sub = self.vocab.split(ids).to(ids.device)                         # (B, N, G)
        logp = self.logits(hidden).log_softmax(-1)                         # (B, N, G, V)
        return -logp.gather(-1, sub[..., None])[..., 0].sum(-1)

    def sample(self, h_cond, h_uncond=None, cfg=1.0, temperature=1.0, top_k=None, top_p=None, generator=None):
        lc, lu = _paired_logits(self.step_logits, h_cond, h_uncond)
        sub = sample(_guide(lc, lu, cfg), temperature, top_k, top_p, generator)   # (B, G)
        return group_ids_to_ids(sub, self.vocab.group_bits)


def ids_to_bits(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """``(...)`` ids -> ``(..., bits)`` int64 0/1, MSB first."""
    shifts = torch.arange(bits - 1, -1, -1, device=ids.device)
    return (ids[..., None] >> shifts) & 1


def bits_to_ids(b: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`ids_to_bits`."""
    bits = b.shape[-1]
    weights = torch.ones(bits, dtype=torch.int64, device=b.device) << torch.arange(bits - 1, -1, -1, device=b.device)
    return (b.long() * weights).sum(-1)


class BitwiseHead(VisualHead):
    """``bits`` independent binary classifiers (two logits each); input ``Linear(bits -> dim)`` on
    the +-1 code vector (Infinity). Its own code embedding: no sub-token tables at all."""

    kind = "bitwise"

    def __init__(self, dim: int, bits: int = 28):
        super().__init__(dim, bits)
        self.code_in = nn.Linear(bits, dim, bias=False)
        self.output = nn.Linear(dim, 2 * bits, bias=False)

    def embed(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        codes = ids_to_bits(ids, self.bits).to(self.code_in.weight.dtype) * 2 - 1
        return self.code_in(codes)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., dim)`` -> ``(..., bits, 2)`` float32 logits (class 1 = bit set)."""
        return self.output(hidden).float().unflatten(-1, (self.bits, 2))

    def nll(self, hidden, ids):
        logp = self.logits(hidden).log_softmax(-1)
        target = ids_to_bits(ids, self.bits)
        return -logp.gather(-1, target[..., None])[..., 0].sum(-1)

    def sample(self, h_cond, h_uncond=None, cfg=1.0, temperature=1.0, top_k=None, top_p=None, generator=None):
        lc, lu = _paired_logits(self.logits, h_cond, h_uncond)
        return bits_to_ids(sample(_guide(lc, lu, cfg), temperature, top_k, top_p, generator))


class IntraTokenHead(VisualHead):
    """The ``groups`` sub-tokens one after another inside the position (:class:`IntraChain`, default
    2 halves), each from its own ``2**(bits/G)``-row output table. Unlike ``split``, a sampled id is
    a combination the model chose jointly, not ``G`` independent draws that may never co-occur.
    With ``G = 4`` x 7 bits the extra cost is ``G - 1`` MLPs of width ``2 dim`` per position, tiny
    beside two 16,384-row output layers."""

    kind = "intra"

    def __init__(self, dim: int, bits: int = 28, groups: int = 2):
        super().__init__(dim, bits)
        if groups < 2:
            raise ConfigError(f"head.kind=intra needs head.groups >= 2, got {groups}")
        self.vocab = VisualVocab(bits=bits, groups=groups)
        V, G = self.vocab.group_size, groups
        self.groups = G
        self.embeddings = nn.ModuleList([nn.Embedding(V, dim) for _ in range(G)])
        self.outputs = nn.ModuleList([nn.Linear(dim, V, bias=False) for _ in range(G)])
        self.chain = IntraChain(dim, G, V)

    def embed(self, ids, check: bool = True):
        sub = self.vocab.split(ids).to(ids.device) if check else ids_to_group_ids(ids, self.bits, self.vocab.group_bits)
        return sum(e(sub[..., g]) for g, e in enumerate(self.embeddings))

    def _logits(self, k: int, x: torch.Tensor, few_rows: bool = False) -> torch.Tensor:
        out = self.outputs[k]
        return (_few_rows_linear(out, x) if few_rows else out(x)).float()

    def factor_logits(self, k: int, hidden: torch.Tensor, prev: torch.Tensor, few_rows: bool = False) -> torch.Tensor:
        """Logits of sub-token ``k`` given the hidden state and the earlier sub-tokens ``prev``
        ``(..., k)`` (same leading dims); ``few_rows``: ``hidden`` is ``(B, dim)`` (sampling)."""
        return self._logits(k, self.chain.features(k, self.chain.context(k, hidden, prev)), few_rows)

    def nll(self, hidden, ids):
        return self.chain.nll(hidden, self.vocab.split(ids).to(ids.device), self._logits)

    def sample(self, h_cond, h_uncond=None, cfg=1.0, temperature=1.0, top_k=None, top_p=None, generator=None):
        sub = self.chain.sample(lambda k, x: self._logits(k, x, few_rows=True), h_cond, h_uncond, cfg,
                                temperature, top_k, top_p, generator)
        return group_ids_to_ids(sub, self.vocab.group_bits)


# parameter names of the two-half intra head of earlier saved generators -> the current ones
_OLD_INTRA_NAMES = {"head.out_hi.": "head.outputs.0.", "head.out_lo.": "head.outputs.1.",
                    "head.hi_cond.": "head.chain.prev.0.", "head.lo_norm.": "head.chain.norms.0.",
                    "head.lo_mlp.": "head.chain.mlps.0.",
                    # before the chain was its own module (shared with UM3's token layout)
                    "head.prev.": "head.chain.prev.", "head.norms.": "head.chain.norms.",
                    "head.mlps.": "head.chain.mlps."}


def upgrade_state_dict(sd):
    """A generator state dict saved with earlier ``intra`` head names (two halves; the chain's
    modules directly on the head) -> now."""
    out = {}
    for k, v in sd.items():
        old = next((o for o in _OLD_INTRA_NAMES if k.startswith(o)), None)
        out[_OLD_INTRA_NAMES[old] + k[len(old):] if old else k] = v
    return out


def make_head(kind: str, dim: int, bits: int, groups: int = 2) -> VisualHead:
    if kind == "split":
        return SplitHead(dim, bits, groups)
    if kind == "bitwise":
        return BitwiseHead(dim, bits)
    if kind == "intra":
        return IntraTokenHead(dim, bits, groups)
    raise ConfigError(f"head.kind must be one of {', '.join(HEAD_KINDS)}, got {kind!r}")
