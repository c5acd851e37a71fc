"""Bytes live in torch's CPU allocator over time: the CPU counterpart of CUDA's memory statistics.

torch keeps no allocator statistics for the CPU (``torch.cuda.max_memory_allocated`` has no CPU
twin), ``tracemalloc`` does not see tensor storages, and the process RSS also counts the Python
heap, the BLAS / oneDNN scratch buffers, thread stacks and pages the C allocator keeps after a
free. torch's profiler, run with ``profile_memory=True``, reports every allocation and free made
through the c10 CPU allocator (the storage of every CPU tensor, the temporaries inside an operator
included) with its size. :class:`AllocatorTrace` sums those events in time order: the bytes live
in tensors at every moment, the figure ``torch.cuda.memory_allocated`` gives on a GPU (there
rounded up to 512-byte blocks; here the requested sizes).

Only blocks allocated after the trace started are counted (the allocator does not know the size
of an older block when it is freed), so start the trace before building what is measured, or
measure increments above a mark within the trace (:meth:`AllocatorTrace.peak`).
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Tuple

import torch

_MARK = "qlip.memtrace:"


class AllocatorTrace:
    """Context manager: trace the CPU allocator; afterwards :meth:`peak` / :meth:`live_at`.

        with AllocatorTrace() as tr:
            x = torch.zeros(1000)       # 4,000 bytes
            tr.mark("x")
            y = x * 2                   # 8,000 live
            del y
        tr.peak("x"), tr.live_at("x")  # 8,000 (+ a few bytes of the mark), 4,000

    A mark itself allocates a few bytes (the profiler range's handle), freed soon after.
    """

    def __init__(self) -> None:
        self.events: List[Tuple[int, int]] = []   # (time ns, bytes: + allocated, - freed), in time order
        self.marks: Dict[str, int] = {}           # name -> time ns
        self._prof = None
        self._count = itertools.count()
        self._names: set = set()

    def __enter__(self) -> "AllocatorTrace":
        # the autograd profiler under torch.profiler: the latter imports torch._inductor on start
        # (seconds to tens of seconds on a loaded machine) for nothing the trace needs
        from torch.autograd.profiler import profile
        self._prof = profile(use_kineto=True, profile_memory=True)
        self._prof.__enter__()
        return self

    def mark(self, name: str) -> None:
        """A named point in time (a zero-length profiler range)."""
        if name in self._names:
            raise ValueError(f"mark {name!r} used twice")
        self._names.add(name)
        with torch.profiler.record_function(f"{_MARK}{next(self._count)}:{name}"):
            pass

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = self._prof.kineto_results.events()
        mem, marks = [], {}
        for i, e in enumerate(events):
            name = e.name()
            if name == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU:
                mem.append((e.start_ns(), i, e.nbytes()))
            elif name.startswith(_MARK):
                marks[name.split(":", 2)[2]] = e.start_ns()
        self.events = [(t, b) for t, _, b in sorted(mem)]
        self.marks = marks
        self._prof = None

    def _time(self, mark: Optional[str]) -> Optional[int]:
        if mark is None:
            return None
        if mark not in self.marks:
            raise KeyError(f"no mark {mark!r} in the trace (marks: {', '.join(self.marks) or 'none'})")
        return self.marks[mark]

    def live_at(self, mark: str) -> int:
        """Bytes live (allocated since the trace started and not freed) at ``mark``."""
        t = self._time(mark)
        return sum(b for s, b in self.events if s <= t)

    def peak(self, start: Optional[str] = None, end: Optional[str] = None) -> int:
        """Most bytes live at any moment between the marks ``start`` and ``end`` (default: the
        whole trace), counted from the trace's start."""
        t0, t1 = self._time(start), self._time(end)
        live = best = 0 if t0 is None else self.live_at(start)
        for s, b in self.events:
            if t0 is not None and s <= t0:
                continue
            if t1 is not None and s > t1:
                break
            live += b
            best = max(best, live)
        return best
