"""Does this torch's FSDP2 give one process's gradients on CPU (gloo) ranks? Plain torch, no qlip code:
a 3-layer MLP, two of its layers ``fully_shard``-ed, each rank backpropagates half of a batch of 8; the
sharded gradients, gathered, are compared with one process's gradients on the whole batch (computed on
every rank), the replicated layer's after an all-reduce mean. Prints the ratio of norms per parameter
(1.0000 = the mean over ranks, as one process; 2.0000 = the ranks' sum) and exits 1 when a gathered
gradient is not one process's. The reason ``qlip.compat.FSDP_ON_CPU`` starts at torch 2.9
(docs/training.md "Torch versions"). Run plainly it launches itself on two ranks with torchrun:

    python benchmarks/fsdp_gloo_grads.py

Measured on this project's 2-core Xeon: torch 2.8.0 prints 2.0000 for every sharded parameter (the ranks'
sum), torch 2.14.1 1.0000 (torch 2.4 / 2.5 / 2.6 stop before, in ``fully_shard`` or its first forward).
"""
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.fsdp import fully_shard  # torch >= 2.6
except ImportError:  # torch 2.4 / 2.5
    from torch.distributed._composable.fsdp import fully_shard


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def launch(ranks: int = 2) -> int:
    """This script under ``torch.distributed.run`` on ``ranks`` CPU processes; their exit code."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                           "--master_addr", "127.0.0.1", "--master_port", str(port), os.path.abspath(__file__)],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4 * world, 8, generator=g), torch.randn(4 * world, 1, generator=g)
    ref = mlp()
    ((ref(x) - y) ** 2).mean().backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    m = mlp()
    fully_shard(m[0])
    fully_shard(m[2])  # m[4] stays replicated (the root is not sharded)
    rows = slice(4 * rank, 4 * rank + 4)
    ((m(x[rows]) - y[rows]) ** 2).mean().backward()
    worst = 0.0
    if rank == 0:
        print(f"torch {torch.__version__}, {world} gloo ranks")
    for name, p in m.named_parameters():
        if hasattr(p.grad, "full_tensor"):
            full, kind = p.grad.full_tensor(), f"sharded {p.grad.placements}"
        else:
            full = p.grad.clone()
            dist.all_reduce(full)
            full, kind = full / world, "replicated, all-reduce mean"
        diff = float((full - ref_grads[name]).abs().max())
        worst = max(worst, diff)
        if rank == 0:
            ratio = float(full.norm() / ref_grads[name].norm())
            print(f"{name:9s} {kind:32s} norm / one process's {ratio:.4f}  max |diff| {diff:.1e}")
    if rank == 0:
        print("one process's gradients" if worst <= 1e-6 else
              "NOT one process's gradients: use train.fsdp on CPU ranks only with torch >= 2.9")
    dist.barrier()
    dist.destroy_process_group()
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main() if "RANK" in os.environ else launch())
