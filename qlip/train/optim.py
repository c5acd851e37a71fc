"""Optimizers, per-module learning rates (paper Table 8) and the warm-up + cosine schedule."""
from __future__ import annotations

import math
from typing import Dict, List

import torch
from torch import nn

from .recipe import OptimSection


def _no_decay(name: str, p: torch.Tensor) -> bool:
    """Norm gains, biases, scalars, position embeddings and the cls token get no weight decay."""
    return p.ndim < 2 or name.endswith(".bias") or "pos_embed" in name or "cls_token" in name


def param_groups(model: nn.Module, o: OptimSection) -> List[Dict]:
    """Groups by module (visual -> lr_visual, text -> lr_text, bottleneck+decoder -> lr_generator,
    the rest -> lr) x (decay, no decay). Frozen parameters and those with learning rate 0 (the
    paper's Table 8 writes frozen modules that way) are left out."""
    lrs = {"visual": o.lr_visual, "text": o.lr_text, "bottleneck": o.lr_generator, "decoder": o.lr_generator}
    groups: Dict = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        module = name.split(".", 1)[0]
        lr = lrs.get(module) if lrs.get(module) is not None else o.lr
        if lr == 0:
            continue
        key = ({"visual": "visual", "text": "text", "bottleneck": "generator", "decoder": "generator"}.get(module, "other"),
               _no_decay(name, p))
        g = groups.setdefault(key, {"params": [], "names": [], "lr": lr,
                                    "weight_decay": 0.0 if key[1] else o.weight_decay, "name": f"{key[0]}{'_nd' if key[1] else ''}"})
        g["params"].append(p)
        g["names"].append(name)
    out = [groups[k] for k in sorted(groups)]
    for g in out:
        g["initial_lr"] = g["lr"]
    return out


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019) as in timm's ``timm.optim.Lamb`` with ``max_grad_norm=None``,
    ``bias_correction=True``, ``grad_averaging=True``, ``trust_clip=False``, ``always_adapt=False``:

        m = beta1 m + (1 - beta1) g,   v = beta2 v + (1 - beta2) g^2
        u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + wd * p
        p -= lr * (||p|| / ||u||) * u      (trust ratio only where wd != 0; 1 if a norm is 0)

    Written here so that training does not import timm (and torchvision) at start-up; the
    trainer clips the global gradient norm itself. ``tests/train`` checks it against timm.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            if not any(p.grad is not None for p in group["params"]):
                continue
            t = group["step"]
            bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
            wd, lr, eps = group["weight_decay"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                update = (m / bc1).div_((v.sqrt() / bc2 ** 0.5).add_(eps))
                if wd != 0:
                    update.add_(p, alpha=wd)
                    w_norm, u_norm = p.norm(2.0), update.norm(2.0)
                    one = torch.ones_like(w_norm)
                    update.mul_(torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, one), one))
                p.add_(update, alpha=-lr)
        return loss


def build_optimizer(groups: List[Dict], o: OptimSection) -> torch.optim.Optimizer:
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if o.optimizer == "adamw":
        return torch.optim.AdamW(clean, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    # clipping is done by the trainer on the global norm (timm's Lamb would clip again by default)
    return Lamb(clean, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


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
