"""Optimizer pieces: timm's LAMB (without its own clipping), schedule, parameter groups."""
import math

import pytest
import torch

from qlip.train.optim import build_optimizer, lr_factor
from qlip.train.tasks.qlip import QLIPOptimSection as OptimSection
from qlip.train.tasks.qlip import qlip_param_groups as param_groups


def test_lamb_is_timms_without_its_own_clipping(tiny_model):
    """Stage 1 uses timm's LAMB; the trainer clips the global norm, so LAMB must not clip again."""
    from timm.optim import Lamb
    o = OptimSection(optimizer="lamb", lr=1e-2, weight_decay=0.05)
    opt = build_optimizer(param_groups(tiny_model, o), o)
    assert isinstance(opt, Lamb) and opt.defaults["max_grad_norm"] is None
    assert {g["name"] for g in opt.param_groups} >= {"visual", "visual_nd", "text", "generator"}


def test_schedule_and_groups(tiny_model):
    o = OptimSection(warmup_steps=10, steps=110, lr=1e-3, lr_visual=2e-4, min_lr_ratio=0.1)
    assert lr_factor(0, o) == pytest.approx(0.1) and lr_factor(9, o) == pytest.approx(1.0)
    assert lr_factor(60, o) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(110, o) == pytest.approx(0.1)
    tiny_model.visual.requires_grad_(False)
    gs = {g["name"]: g for g in param_groups(tiny_model, o)}
    assert "visual" not in gs and "visual_nd" not in gs  # frozen parameters are left out
    assert gs["generator"]["lr"] == 1e-3 and gs["text_nd"]["weight_decay"] == 0.0
    o.lr_visual = None
    tiny_model.visual.requires_grad_(True)
    gs = {g["name"]: g for g in param_groups(tiny_model, o)}
    assert any(n.endswith("pos_embed") for n in gs["visual_nd"]["names"])
    o.lr_text = 0.0  # lr 0 = frozen (paper Table 8): left out of the optimizer
    gs = {g["name"]: g for g in param_groups(tiny_model, o)}
    assert "text" not in gs and "text_nd" not in gs and "visual" in gs
