"""Which precision a device runs in: ``"fp32"``, ``"bf16"`` or ``"auto"`` resolved for a device.

``"auto"`` chooses bf16 only where bf16 matmul is faster than fp32: on a CUDA GPU with bf16 support,
on a CPU with AMX (``amx_bf16`` in ``/proc/cpuinfo``), and on a CPU with the AVX-512 bf16 dot-product
instruction (``avx512_bf16``) where a short matmul measurement finds bf16 at least
``BF16_MIN_SPEEDUP`` x fp32. The flag alone does not decide: on a 2-core Intel Xeon with
``avx512_bf16`` and no AMX bf16 matmul ran at 0.53x fp32, on a 2-core AMD EPYC Zen 4 (same flag, no
AMX) at 2.3x (docs/performance.md). CPUs without either flag run bf16 through slow reference kernels:
fp32. Used by inference (``qlip.load(precision=)``,
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


def _cpuinfo(key: str) -> Optional[str]:
    """The value of the first ``/proc/cpuinfo`` line starting with ``key`` (None where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1]
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where the file does not exist)."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_name() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it (empty where there is none): benchmarks print it."""
    return (_cpuinfo("model name") or "").strip()


def cpu_has_amx_bf16() -> bool:
    """True where the CPU has AMX bf16 tiles, the hardware on which bf16 matmul beats fp32 on CPU."""
    return "amx_bf16" in cpu_flags()


BF16_MIN_SPEEDUP = 1.5  # bf16 / fp32 matmul throughput above which "auto" trains and runs in bf16 on a CPU


@functools.lru_cache(maxsize=1)
def cpu_bf16_matmul_speedup(n: int = 512, reps: int = 5) -> float:
    """bf16 / fp32 throughput of an ``n`` x ``n`` x ``n`` matmul on this CPU with the current torch
    threads (the best of ``reps`` timings of each, after a warm-up; ~0.1 s). Measured once per
    process. The two are tens of percent apart or 2-4x apart on the CPUs we know, so the threshold
    ``BF16_MIN_SPEEDUP`` is not near a noisy boundary."""
    import time
    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = a32.to(dtype), b32.to(dtype)
        torch.mm(a, b)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            times.append(time.perf_counter() - t)
        best[dtype] = min(times)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-12)


def _cpu_auto() -> PrecisionChoice:
    if cpu_has_amx_bf16():
        return PrecisionChoice("bf16", "auto: CPU with AMX (amx_bf16)")
    if "avx512_bf16" not in cpu_flags():
        return PrecisionChoice("fp32", "auto: CPU without AMX or avx512_bf16, where bf16 matmul is slower than fp32")
    speed = cpu_bf16_matmul_speedup()
    if speed >= BF16_MIN_SPEEDUP:
        return PrecisionChoice("bf16", f"auto: CPU with avx512_bf16 (no AMX), bf16 matmul measured {speed:.1f}x fp32")
    return PrecisionChoice("fp32", f"auto: CPU with avx512_bf16 (no AMX), bf16 matmul measured only {speed:.2f}x fp32 "
                                   f"(< {BF16_MIN_SPEEDUP}x)")


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
        return _cpu_auto()
    return PrecisionChoice("fp32", f"auto: {dev.type} device")
