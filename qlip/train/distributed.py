"""Process-group setup for ``torchrun`` (one process per device, any number of nodes).

A plain ``python``/``qlip train`` call runs as a single process without any distributed setup.
Gradients are averaged across ranks after the backward passes of a step (one bucketed
all-reduce, see ``qlip.losses.all_reduce_gradients_``) instead of wrapping the model in DDP:
this serves the plain step, gradient accumulation and gradient caching with one code path.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

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
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_scalar(x: float, info: DistInfo) -> float:
    if not info.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


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
