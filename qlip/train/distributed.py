"""Process-group setup for ``torchrun`` (one process per device, any number of nodes).

A plain ``python``/``qlip train`` call runs as a single process without any distributed setup.
Gradients are averaged across ranks after the backward passes of a step (one bucketed
all-reduce, see ``qlip.nn.collectives.all_reduce_gradients_``) instead of wrapping the model in
DDP: this serves the plain step, gradient accumulation and gradient caching with one code path.

On GPUs the process group is ``cpu:gloo,cuda:nccl`` (NCCL for the gradients and features, gloo
for the few host-side scalars and objects), and every scalar collective is created on the
group's communication device (:func:`qlip.nn.collectives.comm_device`): NCCL alone rejects CPU
tensors, which once made every distributed GPU run die at its first logged step.
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

from ..compat import FSDP_ON_CPU
from ..errors import ConfigError
from ..nn.collectives import all_reduce_floats, comm_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    comm_device: torch.device = torch.device("cpu")  # where scalar collectives put their tensors

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = None) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        global _GROUP_USED
        dist.init_process_group(backend_for(dev), timeout=datetime.timedelta(minutes=30))
        _GROUP_USED = True
    comm = comm_device(fallback=dev) if world > 1 else dev
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev, comm_device=comm)


def backend_for(device: torch.device) -> str:
    """The process-group backends for training on ``device``: on GPUs NCCL for CUDA tensors and
    gloo beside it for CPU ones (scalars, objects), so a CPU tensor in a collective cannot kill
    the run; gloo on CPUs."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_scalars(values: Dict[str, float], info: DistInfo) -> Dict[str, float]:
    """Mean over the ranks of each value, in one collective (every rank passes the same keys)."""
    if not info.enabled:
        return dict(values)
    keys = sorted(values)
    means = all_reduce_floats([values[k] for k in keys], average=True, device=info.comm_device)
    return dict(zip(keys, means))


def mean_scalar(x: float, info: DistInfo) -> float:
    return mean_scalars({"x": x}, info)["x"]


# set when this process initialised a process group (setup): see exit_process
_GROUP_USED = False


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End the process with ``code``; after a distributed run, without interpreter finalisation.

    ``destroy_process_group`` forgets the group but the gloo backend and its worker threads live
    on (the C++ side keeps references). A worker that frees a finished collective's tensors after
    Python dropped them must take the GIL; if the main thread is already finalising the interpreter,
    that ends the worker inside a destructor: "terminate called without an active exception",
    SIGABRT, a failed rank after a complete run (torch 2.14, 2 gloo ranks: about 1 run in 3 idle,
    also after a final barrier and with the last buffers kept alive under load; core dumps:
    ``ProcessGroupGloo::runLoop -> ~AsyncBarrierWork -> ~AsyncAllreduceWork ->
    TensorImpl::decref_pyobject -> take_gil -> pthread_exit``). Everything a run writes is written
    and closed before this point (atomic checkpoints, logs, the summary), so a distributed process
    flushes its streams and leaves with ``os._exit``; a single process exits normally."""
    if not _GROUP_USED:
        sys.exit(code)
    import logging
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to flush
            pass
    os._exit(code)


class RankSlice:
    """Wraps a loader of *global* batches (built with rank 0, world size 1 and the global batch
    size): every rank iterates the same stream and keeps rows ``[rank * b, (rank + 1) * b)``.

    The union of the ranks' batches is then exactly the batch of a single-process run with the
    global batch size, for any number of ranks (``data.global_batches``). Every rank decodes the
    whole global batch, so decoding costs ``world_size`` times more CPU: meant for checks of
    distributed training and for small setups, not for large-scale data loading.
    """

    replicated = True  # stats are those of the global stream, identical on every rank

    def __init__(self, loader, rank: int, world_size: int):
        if loader.batch_size % world_size:
            raise ValueError(f"global batch {loader.batch_size} is not divisible by {world_size} ranks")
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.batch_size = loader.batch_size // world_size

    @property
    def stats(self):
        return self.loader.stats

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        # every rank saved the same global-stream state; any entry will do
        self.loader.load_state_dict(state if isinstance(state, dict) else state[0])

    def __iter__(self):
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.loader:
            yield {k: (v[lo:hi] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}


# ---- FSDP (train.fsdp): the task's units (transformer blocks) sharded with FSDP2 ----------------
# Everything outside the units (patch / token embeddings, norms, projections, QLIP's bottleneck
# and logit scale: a few percent of an L-size model) stays replicated, and its gradients are
# averaged with the bucketed all-reduce as without FSDP. Checkpoints hold *full* tensors in the
# same format as unsharded runs, so a run saved under FSDP loads in one process and vice versa.

def _dtensor_api():
    """``(DTensor, distribute_tensor)`` across torch versions."""
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor  # torch >= 2.5
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import DTensor, distribute_tensor
    return DTensor, distribute_tensor


def is_sharded(t) -> bool:
    return isinstance(t, _dtensor_api()[0])


def check_fsdp_device(device: torch.device) -> None:
    """A one-line ConfigError where this torch's FSDP2 cannot shard CPU ranks correctly (torch < 2.9:
    2.4 / 2.5 die for want of CUDA streams, 2.6 on a stream method, 2.7 / 2.8 sum the sharded
    gradients over the ranks instead of averaging them; :mod:`qlip.compat`)."""
    if torch.device(device).type == "cpu" and not FSDP_ON_CPU:
        raise ConfigError(f"train.fsdp on CPU ranks needs torch >= 2.9 (torch {torch.__version__}'s fully_shard "
                          f"cannot shard CPU ranks like one process): leave train.fsdp off (every rank keeps the "
                          f"whole model), train on GPUs, or upgrade torch")


def shard_units(units: List[nn.Module]) -> int:
    """``fully_shard`` (FSDP2) each module of ``units`` over all ranks (a task's
    :meth:`~qlip.train.task.Task.fsdp_units`, e.g. every transformer block). Returns their number."""
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import fully_shard
    for unit in units:
        fully_shard(unit)
    return len(units)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (a collective for sharded tensors: call on all ranks)."""
    return t.full_tensor() if is_sharded(t) else t


def full_state_dict(module) -> dict:
    """``module.state_dict()`` with sharded entries gathered (collective, same order on every rank)."""
    return {k: full_tensor(v).detach() for k, v in module.state_dict().items()}


def shard_state_like(module, state: dict) -> dict:
    """Full tensors of ``state`` turned into shards shaped like ``module``'s sharded entries."""
    distribute_tensor = _dtensor_api()[1]
    own = module.state_dict()
    out = {}
    for k, v in state.items():
        cur = own.get(k)
        if cur is not None and is_sharded(cur) and not is_sharded(v):
            v = distribute_tensor(v.to(cur.dtype), cur.device_mesh, cur.placements)
        out[k] = v
    return out


def full_optimizer_state(optimizer) -> dict:
    """``optimizer.state_dict()`` with sharded moment tensors gathered: the unsharded format."""
    sd = optimizer.state_dict()
    sd["state"] = {i: {k: full_tensor(v) if torch.is_tensor(v) else v for k, v in s.items()}
                   for i, s in sd["state"].items()}
    return sd


def shard_optimizer_state_(optimizer) -> None:
    """After ``load_state_dict`` of full moments: shard each moment like its parameter."""
    distribute_tensor = _dtensor_api()[1]
    for p, s in optimizer.state.items():
        if not is_sharded(p):
            continue
        for k, v in list(s.items()):
            if torch.is_tensor(v) and not is_sharded(v) and v.shape == p.shape:
                s[k] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements)


def _sum_squares_f64(t: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Sum of squares in float64, in chunks of ``chunk`` elements: float64 accuracy with
    temporaries of at most 16 MB, not a float64 copy of the largest gradient."""
    total = torch.zeros((), dtype=torch.float64, device=t.device)
    for part in t.reshape(-1).split(chunk):
        total += part.double().pow(2).sum()
    return total


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Global-norm gradient clipping over sharded and replicated gradients; returns the total norm
    (the same on every rank). Replicated gradients must already be averaged across ranks.

    The squares are summed in float64 in every case, one process included: torch's float32 norm
    differs from it by ~1e-5 relative over large tables (a 16,384-row head), which was the whole
    difference between one process and two ranks of the same run (docs/training.md)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    sharded = any(is_sharded(g) for g in grads)
    dev = (grads[0].to_local() if is_sharded(grads[0]) else grads[0]).device  # NCCL: the GPU, never the CPU
    sq_sharded = torch.zeros((), dtype=torch.float64, device=dev)
    sq_repl = torch.zeros((), dtype=torch.float64, device=dev)
    for g in grads:
        if is_sharded(g):
            sq_sharded += _sum_squares_f64(g.to_local())
        else:
            sq_repl += _sum_squares_f64(g)
    if sharded:
        dist.all_reduce(sq_sharded)  # every rank holds one shard of each sharded gradient
    total = (sq_sharded + sq_repl).sqrt().float()
    coef = max_norm / (total + 1e-6)
    if torch.isfinite(total) and coef < 1:
        for g in grads:
            (g.to_local() if is_sharded(g) else g).mul_(coef)
    return total
