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

``precision="auto"`` chooses bf16 only where it is faster than fp32: on a CUDA GPU with bf16
support, and on a CPU with AMX (``amx_bf16`` in ``/proc/cpuinfo``). On other CPUs bf16 matmuls run
slower than fp32 ones (0.5-0.6x measured), so auto picks fp32 there.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")
# modules kept in float32 by the bf16 cast-once path (names relative to the QLIP model)
FP32_MODULES: Tuple[str, ...] = ("bottleneck.down",)


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a model runs in (``"fp32"`` or ``"bf16"``) and why (for verbose output)."""
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where the file does not exist)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_amx_bf16() -> bool:
    """True where the CPU has AMX bf16 tiles, the hardware on which bf16 matmul beats fp32 on CPU."""
    return "amx_bf16" in cpu_flags()


def resolve_precision(precision: Optional[str],
                      device: Union[str, torch.device, None] = None) -> PrecisionChoice:
    """``"fp32"`` / ``"bf16"`` / ``"auto"`` (or None = fp32) -> the concrete choice for ``device``."""
    if precision is None:
        precision = "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return PrecisionChoice(precision, "asked for")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return PrecisionChoice("bf16", "auto: CUDA GPU with bf16 support")
        return PrecisionChoice("fp32", "auto: CUDA device without bf16 support")
    if dev.type == "cpu":
        if cpu_has_amx_bf16():
            return PrecisionChoice("bf16", "auto: CPU with AMX (amx_bf16)")
        return PrecisionChoice("fp32", "auto: CPU without AMX (amx_bf16 not in /proc/cpuinfo), where bf16 "
                                       "matmul is slower than fp32")
    return PrecisionChoice("fp32", f"auto: {dev.type} device")


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

