"""Optimizers (timm's LAMB, AdamW), parameter groups with per-group learning rates, and the warm-up + cosine schedule."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from .recipe import OptimSection


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm gains, biases, scalars, position embeddings and the cls token get no weight decay."""
    return p.ndim < 2 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name


def param_groups(model: nn.Module, assign: Callable[[str], Tuple[str, Optional[float]]],
                 weight_decay: float) -> List[Dict]:
    """Optimizer groups of ``model``'s trainable parameters: (``assign(name)``'s group name) x
    (decay, no decay). ``assign`` maps a parameter name to ``(group, lr)``; parameters that are
    frozen or whose lr is 0 (the paper's Table 8 writes frozen modules that way) are left out.
    Each group carries ``names`` (for checks and logs) and ``initial_lr`` (for the schedule)."""
    groups: Dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group, lr = assign(name)
        if lr == 0:
            continue
        key = (group, _no_decay(name, p))
        g = groups.setdefault(key, {"params": [], "names": [], "lr": lr,
                                    "weight_decay": 0.0 if key[1] else weight_decay,
                                    "name": f"{group}{'_nd' if key[1] else ''}"})
        g["params"].append(p)
        g["names"].append(name)
    out = [groups[k] for k in sorted(groups)]
    for g in out:
        g["initial_lr"] = g["lr"]
    return out


def build_optimizer(groups: List[Dict], o: OptimSection, foreach: Optional[bool] = None) -> torch.optim.Optimizer:
    """``foreach=False`` for parameter lists that mix sharded (DTensor) and plain tensors (FSDP)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if o.optimizer == "adamw":
        return torch.optim.AdamW(clean, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 foreach=foreach)
    try:
        from timm.optim import Lamb
    except ImportError:
        raise ConfigError("optimizer lamb needs timm: pip install 'qlip[train]'") from None
    # the trainer clips the global gradient norm itself: switch off Lamb's own clipping
    return Lamb(clean, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, max_grad_norm=None)


def lr_factor(step: int, o: OptimSection) -> float:
    """Linear warm-up to 1, then cosine (or constant) decay to ``min_lr_ratio`` at ``steps``."""
    if o.warmup_steps > 0 and step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "constant":
        return 1.0
    span = max(1, o.steps - o.warmup_steps)
    progress = min(1.0, (step - o.warmup_steps) / span)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, step: int, o: OptimSection) -> float:
    f = lr_factor(step, o)
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * f
    return f
