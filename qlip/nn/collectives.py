"""Collectives that carry gradients, for losses that are statistics of the global batch.

Data-parallel training runs one process per device; every rank computes its loss from global
quantities (the contrastive logits against every rank's features, the BSQ codebook entropy of the
code distribution averaged over every rank's tokens) and the parameter gradients are then averaged
over the ranks (DDP, or :func:`all_reduce_gradients_`). For that average to equal the
gradient of a single process on the concatenated batch, a collective's backward must send every
rank's share of the gradient back to the rows that produced it:

* :func:`gather_with_grad`: the backward sums the gradients of all ranks and keeps the owner's rows;
* :func:`all_reduce_sum_with_grad`: the backward is again an all-reduce (sum) of the gradients.

Both are small autograd functions of our own (``torch.distributed.nn.functional`` is deprecated)
and work on every backend, gloo included. Every rank must call them, and their backward, the same
number of times in the same order.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["distributed_world", "resolve_world", "exchange_sizes", "gather_with_grad",
           "all_reduce_sum_with_grad", "global_mean_with_grad", "all_reduce_gradients_", "comm_device",
           "all_reduce_floats"]


def distributed_world(group=None) -> Tuple[int, int]:
    """Return ``(world_size, rank)`` of ``group``; ``(1, 0)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group=group), dist.get_rank(group=group)


def resolve_world(distributed: Optional[bool], group, owner: str) -> Tuple[int, int]:
    """``(world_size, rank)`` for a module's ``distributed`` switch.

    ``None``: the process group's world when torch.distributed is initialised, else ``(1, 0)``;
    ``False``: always ``(1, 0)`` (local computation); ``True``: the process group's world, and a
    ``RuntimeError`` naming ``owner`` when none is initialised.
    """
    if distributed is False:
        return 1, 0
    if distributed is True and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{owner}(distributed=True) needs an initialised torch.distributed process group")
    return distributed_world(group)


def exchange_sizes(n: int, device: torch.device, group=None) -> List[int]:
    """All-gather the local batch size of every rank (one tiny collective, one host sync)."""
    world, _ = distributed_world(group)
    mine = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    return [int(s.item()) for s in sizes]


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of equally sized tensors whose backward sums every rank's gradient.

    Backward: all-reduce (sum) of the gradient of the gathered tensor, then the owner's slice.
    Every rank's loss depends on every rank's rows, so rank r's rows receive
    ``sum_r' d loss_r' / d x_r``. (An all-reduce moves twice the bytes of a reduce-scatter, but
    it works on every backend, gloo included, and the tensors are only ``N x P`` embeddings.)
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        world, rank = distributed_world(group)
        ctx.group, ctx.rank, ctx.n = group, rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def gather_with_grad(tensor: torch.Tensor, sizes: List[int], group=None) -> torch.Tensor:
    """Concatenate ``tensor`` (first dim ``sizes[rank]``) from all ranks, keeping gradients.

    The local rows keep their autograd graph and also receive the gradient that the other
    ranks' losses send them (see :class:`_AllGatherWithGrad`). Unequal sizes are handled by
    zero-padding to the largest size before the gather; ``sizes`` comes from
    :func:`exchange_sizes` (every rank must pass the same list).
    """
    max_n = max(sizes)
    n = tensor.shape[0]
    if n < max_n:
        pad = tensor.new_zeros((max_n - n,) + tuple(tensor.shape[1:]))
        tensor = torch.cat([tensor, pad], dim=0)
    gathered = _AllGatherWithGrad.apply(tensor, group)
    if all(s == max_n for s in sizes):
        return gathered
    return torch.cat([gathered[r * max_n : r * max_n + s] for r, s in enumerate(sizes)], dim=0)


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is the sum over ranks of the gradients.

    Every rank's loss depends on the sum ``S = sum_r x_r``, so ``x_r`` receives
    ``sum_r' d loss_r' / d S``.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``sum_r tensor_r`` over the ranks of ``group`` (same shape on every rank), with gradients."""
    return _AllReduceSumWithGrad.apply(tensor, group)


def global_mean_with_grad(rows: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over the first dimension of the rows of **all** ranks, with gradients.

    ``rows`` is ``(n_r, ...)`` on rank ``r`` (``n_r`` may differ between ranks, 0 included): the
    result ``sum_r rows_r.sum(0) / sum_r n_r`` equals ``torch.cat(all rows).mean(0)``, on every
    rank. Two collectives (the row sums, with gradients, and the row counts, exact in float64);
    no host synchronisation.
    """
    count = torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return all_reduce_sum_with_grad(rows.sum(0), group) / count.to(rows.dtype)


def comm_device(group=None, fallback: Optional[torch.device] = None) -> torch.device:
    """The device whose tensors the collectives of ``group`` accept.

    NCCL takes CUDA tensors only, gloo CPU tensors; a group made of several backends
    (``"cpu:gloo,cuda:nccl"``) takes both, and the CPU is then preferred for host-side scalars.
    A scalar a training loop reduces (a logged loss, a sample count) must be created on this
    device, or the first such collective under NCCL alone fails ("No backend type associated
    with device type cpu"). ``fallback`` (default CPU) without a process group.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return fallback if fallback is not None else torch.device("cpu")
    config = _backend_config(group)
    devices = {part.split(":", 1)[0] for part in config.split(",") if ":" in part}
    if not devices or "cpu" in devices:  # a plain backend name (gloo, mpi) serves the CPU
        return torch.device("cpu")
    if "cuda" in devices:
        return torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return torch.device(sorted(devices)[0])


def _backend_config(group=None) -> str:
    """``"cpu:gloo,cuda:nccl"``-style description of ``group``'s backends (torch >= 2.2), else
    the backend's name (``"nccl"``: CUDA only; ``"gloo"``: CPU)."""
    get_config = getattr(dist, "get_backend_config", None)
    if get_config is not None:
        return str(get_config(group)).lower()
    name = str(dist.get_backend(group)).lower()
    return "cuda:nccl" if name == "nccl" else name


def all_reduce_floats(values: Sequence[float], group=None, average: bool = False,
                      device: Optional[torch.device] = None) -> List[float]:
    """Sum (or mean) of each of ``values`` over the ranks, in one float64 collective on the
    group's communication device (:func:`comm_device`). Identity without a process group."""
    world, _ = distributed_world(group)
    if world == 1 or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device or comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    if average:
        t /= world
    return [float(v) for v in t.cpu()]


@torch.no_grad()
def all_reduce_gradients_(parameters: Iterable[torch.Tensor], group=None, average: bool = True) -> None:
    """All-reduce (mean by default) the ``.grad`` of ``parameters`` across ranks, in place.

    The manual replacement for DDP's gradient averaging after :func:`grad_cache_step`.
    Parameters whose ``.grad`` is None are skipped: every rank must have gradients for the same
    parameters (in the same order). No-op when torch.distributed is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group=group)
    if world == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    # one flat buffer per (device, dtype): one collective each instead of one per parameter
    buckets: dict = {}
    for g in grads:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for bucket in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
