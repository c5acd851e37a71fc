"""Binary Spherical Quantization (BSQ), the bottleneck of QLIP.

A token is an ``L``-dimensional vector ``u`` (normally already on the unit sphere). It is
quantised to ``sign(u) / sqrt(L)`` (with ``sign(0) = -1``) and identified by the integer whose
bit ``i`` is 1 when channel ``i`` is positive, channel 0 being the most significant bit:

    id = sum_i bit_i * 2 ** (L - 1 - i)

Ids are computed with integer arithmetic in int64, exact for every ``L <= 62`` (the official
code sums powers of two in float32 and rounds ids above 24 bits). Groups of ``g`` consecutive
channels give group ids (MSB first too), used by factorised downstream heads.

Training terms (all linear in ``L``; nothing of size ``2 ** L`` is ever built):

* per-sample entropy ``H(p(c | u))`` and codebook entropy ``H(E_u[p(c | u)])`` of the soft
  assignment ``p(c | u) ∝ exp(2 tau <u, c>)`` over the codes. Both factorise over groups of
  ``g`` bits: ``"group"`` mode evaluates each group's ``2 ** g``-way softmax; ``"analytical"``
  mode evaluates the per-sample term per bit in closed form (it factorises exactly) and the
  codebook term with the same groups. The codebook term summed over groups is the usual
  factorised approximation (an upper bound) of the entropy of the full ``2 ** L``-way code
  distribution. Under data parallelism the batch average ``E_u`` runs over the **global** batch
  (see :class:`BinarySphericalQuantizer`, ``distributed``).
* commitment ``beta * mean_tokens sum_c (sg(u_hat) - u) ** 2``.

``loss = commit + (gamma_0 * H_persample - gamma_1 * H_codebook) / inv_temperature``, the same
quantity the official release returns. Minimising it makes each token's assignment confident
and the batch's code usage uniform (the loss is negative when usage is spread: that is normal).
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from ..errors import DataError
from ..nn.collectives import global_mean_with_grad, resolve_world

ENTROPY_EPS = 1e-8


def _entr(p: torch.Tensor) -> torch.Tensor:
    """Elementwise ``-p log p`` of ``p + 1e-8`` (the reference's smoothing)."""
    p = p + ENTROPY_EPS
    return -p * torch.log(p)


def bits_to_ids(bits: torch.Tensor) -> torch.Tensor:
    """``(..., L)`` 0/1 (any int/bool dtype) -> ``(...)`` int64 ids, channel 0 = MSB. Exact."""
    L = bits.shape[-1]
    if L > 62:
        raise ValueError(f"ids of {L} bits do not fit in int64")
    shifts = torch.arange(L - 1, -1, -1, device=bits.device, dtype=torch.int64)
    return (bits.to(torch.int64) << shifts).sum(-1)


def ids_to_bits(ids: torch.Tensor, num_bits: int) -> torch.Tensor:
    """``(...)`` int ids -> ``(..., L)`` int64 bits in {0, 1}, channel 0 = MSB. Exact."""
    shifts = torch.arange(num_bits - 1, -1, -1, device=ids.device, dtype=torch.int64)
    return (ids.to(torch.int64).unsqueeze(-1) >> shifts) & 1


def ids_to_group_ids(ids: torch.Tensor, num_bits: int, group_size: int) -> torch.Tensor:
    """``(...)`` ids -> ``(..., L / g)`` group ids; group 0 holds the most significant bits."""
    if num_bits % group_size:
        raise ValueError(f"group size {group_size} does not divide {num_bits} bits")
    groups = num_bits // group_size
    shifts = torch.arange(groups - 1, -1, -1, device=ids.device, dtype=torch.int64) * group_size
    return (ids.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << group_size) - 1)


def group_ids_to_ids(group_ids: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(..., G)`` group ids -> ``(...)`` ids (inverse of :func:`ids_to_group_ids`)."""
    G = group_ids.shape[-1]
    shifts = torch.arange(G - 1, -1, -1, device=group_ids.device, dtype=torch.int64) * group_size
    return (group_ids.to(torch.int64) << shifts).sum(-1)


def check_ids(ids: torch.Tensor, num_bits: int, what: str = "ids") -> None:
    """Raise :class:`DataError` unless ``ids`` is an integer tensor with values in ``[0, 2**L)``."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise DataError(f"{what} must be an integer array, got dtype {ids.dtype}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= (1 << num_bits):
            raise DataError(f"{what} must lie in [0, 2**{num_bits}) = [0, {1 << num_bits}), "
                            f"found values in [{lo}, {hi}]")


def cross_correlation(u: torch.Tensor) -> torch.Tensor:
    """Squared off-diagonal correlations between the ``L`` pre-quantisation numbers of ``u``
    ``(..., L)`` over all its tokens (each number standardised over them), divided by ``L``: 0 when no
    two bits covary, ``L - 1`` when all are copies of one. Ours (the recipe's
    ``loss.bit_decorrelation``, off by default): a code whose bits repeat each other carries few
    distinct ids (the demo's stage-1 code used 881 of 2^28 over 20,480 tokens); penalising the
    correlations spreads it (docs/demo.md, "Ninth round"). Computed over the tokens this call sees:
    per rank (and per chunk when the loss is chunked), not over the global batch."""
    flat = u.reshape(-1, u.shape[-1]).float()
    z = (flat - flat.mean(0)) / (flat.std(0) + 1e-5)
    corr = (z.T @ z) / flat.shape[0]
    off = corr - torch.diag(torch.diagonal(corr))
    return (off ** 2).sum() / u.shape[-1]


class BinarySphericalQuantizer(nn.Module):
    """BSQ over the last dimension of ``(..., L)`` inputs.

    ``codes, ids, loss, stats = bsq(u)``: ``codes`` are ``±1/sqrt(L)`` (``±1`` when
    ``l2_norm=False``) with a straight-through gradient, ``ids`` exact int64 of shape ``(...)``,
    ``loss`` the scalar training term described in the module docstring, ``stats`` a dict of
    scalar tensors (``persample_entropy``, ``codebook_entropy``, ``commit``) computed in training
    mode or when ``compute_loss=True``.

    Data parallelism (``distributed``): the codebook entropy is the entropy of the soft code
    distribution averaged over the tokens of the batch. With ``None`` (default) and an initialised
    torch.distributed process group of more than one rank, that average is taken over the tokens
    of **all** ranks (an all-reduce of the per-group probability sums, weighted by each rank's
    token count, whose backward sends every rank's gradient back), so the codebook term and, after
    the usual mean of the parameter gradients over ranks, its gradients equal those of one process
    on the concatenated batch; the per-sample terms stay per-rank means. Every rank must then call
    the loss (and its backward) the same number of times. ``False`` keeps the average local (the
    official code's per-rank statistic); ``True`` requires a process group. ``group`` selects the
    process group (default: the world).
    """

    def __init__(self, embed_dim: int = 28, group_size: int = 7, inv_temperature: float = 1.0,
                 l2_norm: bool = True, beta: float = 0.0, gamma_0: float = 1.0, gamma_1: float = 1.0,
                 persample_entropy: str = "group", distributed: Optional[bool] = None, group=None,
                 decorrelation: float = 0.0):
        super().__init__()
        if embed_dim < 1 or embed_dim > 62:
            raise ValueError(f"embed_dim (bits per token) must be in [1, 62], got {embed_dim}")
        if group_size < 1 or embed_dim % group_size:
            raise ValueError(f"group_size {group_size} must divide embed_dim {embed_dim}")
        if group_size > 16:
            raise ValueError(f"group_size {group_size} > 16 would build a {2 ** group_size}-entry "
                             "group codebook; use a smaller group")
        if persample_entropy not in ("group", "analytical"):
            raise ValueError(f"persample_entropy must be 'group' or 'analytical', got {persample_entropy!r}")
        self.embed_dim, self.group_size = embed_dim, group_size
        self.inv_temperature, self.l2_norm = float(inv_temperature), bool(l2_norm)
        self.beta, self.gamma_0, self.gamma_1 = float(beta), float(gamma_0), float(gamma_1)
        self.persample_entropy = persample_entropy
        self.decorrelation = float(decorrelation)
        self.distributed, self.group = distributed, group
        self._reference: Optional[Tuple[torch.Tensor, float]] = None  # set by codebook_reference
        self.scale = 1.0 / math.sqrt(embed_dim) if l2_norm else 1.0
        # the 2**g sign patterns of one group, MSB first, as +-1
        patterns = ids_to_bits(torch.arange(2 ** group_size), group_size).float() * 2 - 1
        self.register_buffer("group_codebook", patterns, persistent=False)

    @property
    def num_bits(self) -> int:
        return self.embed_dim

    @property
    def num_groups(self) -> int:
        return self.embed_dim // self.group_size

    # ---- conversions -------------------------------------------------------------------------
    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Quantised (or any real) ``(..., L)`` -> int64 ids; positive channel = bit 1."""
        return bits_to_ids(codes > 0)

    def ids_to_bits(self, ids: torch.Tensor) -> torch.Tensor:
        return ids_to_bits(ids, self.embed_dim)

    def ids_to_group_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids_to_group_ids(ids, self.embed_dim, self.group_size)

    def group_ids_to_ids(self, group_ids: torch.Tensor) -> torch.Tensor:
        return group_ids_to_ids(group_ids, self.group_size)

    def ids_to_codes(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """int ids ``(...)`` -> codes ``(..., L)`` of value ``±scale`` (validates the range)."""
        check_ids(ids, self.embed_dim)
        return (self.ids_to_bits(ids).to(dtype) * 2 - 1) * self.scale

    def group_ids_to_codes(self, group_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        check_ids(group_ids, self.group_size, "group ids")
        return self.ids_to_codes(self.group_ids_to_ids(group_ids), dtype)

    # ---- quantisation ------------------------------------------------------------------------
    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        """``±scale`` codes with a straight-through gradient (identity w.r.t. ``u``)."""
        hard = torch.where(u > 0, torch.ones_like(u), -torch.ones_like(u))
        if torch.is_grad_enabled() and u.requires_grad:
            hard = u + (hard - u).detach()
        return hard * self.scale

    def _soft_codes(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(u as (n, G, g) in fp32+, p(c | u) as (n, G, 2^g))``."""
        u = u.reshape(-1, self.num_groups, self.group_size)
        if u.dtype not in (torch.float32, torch.float64):
            u = u.float()  # entropies in reduced precision are too coarse
        cb = self.group_codebook.to(u) * self.scale                          # (2^g, g)
        # outside autocast: under bf16 autocast the einsum ran in bf16, and the entropies of 28 bits
        # (~19 nats) came out rounded to bf16's 8 bits of mantissa (the two terms of the loss equal)
        with torch.autocast(u.device.type, enabled=False):
            logits = 2 * self.inv_temperature * torch.einsum("ngc,kc->ngk", u, cb)
            return u, logits.softmax(-1)

    def code_distribution_sum(self, u: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """``(sum over the tokens of p(c | u), (G, 2^g); number of tokens)``: the pieces of the
        batch's soft code distribution, to be summed over chunks (and ranks) by the caller."""
        _, prob = self._soft_codes(u)
        return prob.sum(0), prob.shape[0]

    def reference_from_sums(self, prob_sum: torch.Tensor, count: int) -> Tuple[torch.Tensor, float]:
        """``(whole-batch mean code distribution, this rank's gradient share)`` from the local
        :meth:`code_distribution_sum` pieces summed over chunks: the arguments of
        :meth:`codebook_reference`. Over all ranks (two all-reduces) unless ``distributed``
        keeps the statistic local, as :meth:`_batch_mean` does for the plain loss."""
        world, _ = resolve_world(self.distributed, self.group, type(self).__name__)
        if world == 1:
            return prob_sum / count, 1.0
        import torch.distributed as dist
        prob_sum = prob_sum.clone()
        total = torch.tensor([float(count)], dtype=torch.float64, device=prob_sum.device)
        dist.all_reduce(prob_sum, group=self.group)
        dist.all_reduce(total, group=self.group)
        n_all = float(total.item())
        return prob_sum / n_all, world * count / n_all

    @contextlib.contextmanager
    def codebook_reference(self, mean_prob: torch.Tensor, share: float = 1.0) -> Iterator[None]:
        """Within the block, the codebook entropy is that of ``mean_prob`` (the soft code
        distribution of a whole batch, (G, 2^g), e.g. summed from :meth:`code_distribution_sum`
        over the chunks of a gradient-cached step and all ranks) instead of the current input's,
        and its gradient is the whole batch's gradient restricted to the current tokens:

            H = H(P) + < dH/dP (P), m - sg(m) > * share,    m = mean of the current tokens' p(c | u)

        With each chunk's loss weighted by its fraction of the local batch (as gradient caching
        does) and ``share = world_size * local_tokens / global_tokens``, the accumulated (and
        rank-averaged) gradients equal those of the codebook entropy of the whole global batch."""
        prev = self._reference
        self._reference = (mean_prob.detach(), float(share))
        try:
            yield
        finally:
            self._reference = prev

    def entropy_terms(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Soft per-sample and codebook entropies (nats, summed over groups) of ``u`` ``(..., L)``."""
        u, prob = self._soft_codes(u)                                       # (n, G, 2^g)
        if self.persample_entropy == "group":
            persample = _entr(prob).sum((-2, -1)).mean()
        else:  # closed form per bit: p(bit = 0) = sigmoid(-4 tau u / sqrt(L)) (with l2 scale)
            p0 = torch.sigmoid(-4 * self.inv_temperature * u * self.scale)
            persample = (_entr(p0) + _entr(1 - p0)).sum((-2, -1)).mean()
        ref = self._reference
        if ref is None:
            codebook = _entr(self._batch_mean(prob)).sum()
        else:  # a whole-batch distribution given by codebook_reference (gradient caching)
            big, share = ref
            big = big.to(prob)
            grad = -(torch.log(big + ENTROPY_EPS) + 1)  # d/dP of _entr(P) = -(P + eps) log(P + eps)
            m = prob.mean(0)
            codebook = _entr(big).sum() + (grad * (m - m.detach())).sum() * share
        return persample, codebook

    def _batch_mean(self, prob: torch.Tensor) -> torch.Tensor:
        """Mean of the per-token distributions ``(n, G, 2^g)`` over the batch, over all ranks when
        distributed (see the class docstring)."""
        world, _ = resolve_world(self.distributed, self.group, type(self).__name__)
        return global_mean_with_grad(prob, self.group) if world > 1 else prob.mean(0)

    def forward(self, u: torch.Tensor, compute_loss: bool = None):
        if u.shape[-1] != self.embed_dim:
            raise ValueError(f"BSQ expects last dimension {self.embed_dim}, got shape {tuple(u.shape)}")
        codes = self.quantize(u)
        ids = self.codes_to_ids(u)
        if compute_loss is None:
            compute_loss = self.training
        if not compute_loss:
            return codes, ids, u.new_zeros(()), {}
        persample, codebook = self.entropy_terms(u)
        commit = ((codes.detach() - u) ** 2).sum(-1).mean()
        loss = self.beta * commit + (self.gamma_0 * persample - self.gamma_1 * codebook) / self.inv_temperature
        stats: Dict[str, torch.Tensor] = {"persample_entropy": persample.detach(),
                                          "codebook_entropy": codebook.detach(), "commit": commit.detach()}
        if self.decorrelation:  # ours, off by default: no two bits should say the same thing
            corr = cross_correlation(u)
            loss = loss + self.decorrelation * corr
            stats["bit_correlation"] = corr.detach()
        return codes, ids, loss, stats

    def extra_repr(self) -> str:
        return (f"bits={self.embed_dim}, group_size={self.group_size}, inv_temperature={self.inv_temperature}, "
                f"l2_norm={self.l2_norm}, beta={self.beta}, gamma=({self.gamma_0}, {self.gamma_1}), "
                f"persample_entropy={self.persample_entropy!r}"
                + (f", decorrelation={self.decorrelation}" if self.decorrelation else ""))
