"""Inference precision: fp32, or bf16 weights cast once that keep the token ids.

``qlip.load(..., precision="bf16")`` (and ``--precision bf16`` on the command line) converts the
model's weights to bfloat16 *once*, instead of re-casting float32 weights at every call as
``torch.autocast`` does, and keeps in float32 only the modules that decide the token bits:

* ``bottleneck.down``, the pre-sign projection: the signs of its output are the bits, so it runs in
  float32 (``Bottleneck.project`` promotes bf16 features to float32 before it).

Everything else (encoder, ``bottleneck.up``, decoder, text tower) runs in bf16. Which modules to
keep was measured (docs/performance.md, "bf16 that keeps the ids"): keeping the last encoder
block(s) in float32 as well gains little, because the bf16 rounding of the residual stream built up
by all earlier blocks is what flips most of the remaining bits.

``precision="auto"`` chooses bf16 only where it is faster than fp32 (``qlip.nn.precision``, shared
with the training engine, which must not import model code; its names are re-exported here).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..nn.precision import PRECISIONS, PrecisionChoice, cpu_flags, cpu_has_amx_bf16, resolve_precision

__all__ = ["FP32_MODULES", "PRECISIONS", "PrecisionChoice", "cast_for_inference", "cpu_flags",
           "cpu_has_amx_bf16", "resolve_precision"]

# modules kept in float32 by the bf16 cast-once path (names relative to the QLIP model)
FP32_MODULES: Tuple[str, ...] = ("bottleneck.down",)


def _inputs_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def cast_for_inference(model: nn.Module, precision: str, keep_fp32: Sequence[str] = FP32_MODULES) -> nn.Module:
    """Convert ``model`` in place for inference in ``precision`` (``"fp32"`` or ``"bf16"``).

    bf16: every parameter and floating buffer becomes bfloat16 once, except the modules named in
    ``keep_fp32``, which stay float32 and read their inputs in float32 (a forward pre-hook casts
    them; the activations are small, the weights are never re-cast). Returns ``model``.
    """
    if precision == "fp32":
        return model.float()
    if precision != "bf16":
        raise ConfigError(f"cast_for_inference: precision must be 'fp32' or 'bf16', got {precision!r}")
    kept = [m for m in (_find(model, name) for name in keep_fp32) if m is not None]
    skip = {id(x) for m in kept for x in m.modules()}  # never rounded to bf16 and back (lossy)
    for module in model.modules():
        if id(module) in skip:
            continue
        for name, p in module._parameters.items():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
        for name, b in module._buffers.items():
            if b is not None and b.is_floating_point():
                module._buffers[name] = b.to(torch.bfloat16)
    for module in kept:
        module.float()
        if not getattr(module, "_qlip_fp32_hook", False):
            module.register_forward_pre_hook(_inputs_to_fp32)
            module._qlip_fp32_hook = True
    return model


def _find(model: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None

