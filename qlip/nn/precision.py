"""Which precision a device runs in: ``"fp32"``, ``"bf16"`` or ``"auto"`` resolved for a device.

``"auto"`` chooses bf16 only where bf16 matmul is faster than fp32: on a CUDA GPU with bf16 support,
and on a CPU with AMX (``amx_bf16`` in ``/proc/cpuinfo``). On other CPUs bf16 matmuls run slower than
fp32 ones (0.5-0.6x measured), so auto picks fp32 there. Used by inference (``qlip.load(precision=)``,
which casts weights once: ``qlip.model.precision``) and by the training engine (``train.precision``,
bf16 autocast), so it lives below both.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..errors import ConfigError

PRECISIONS = ("fp32", "bf16", "auto")


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
