"""Sampling speed of the qlip.gen generator: KV cache vs full recomputation, and batch scaling.

    python benchmarks/sample.py [--preset gpt-demo] [--grid 16] [--text-len 16] [--batch 4]
                                [--batches 1,4,16] [--device cpu] [--threads N]

Random weights (speed does not depend on them). Measures, in one run:

* tokens/s generating ``grid x grid`` image tokens (256 by default) at ``--batch`` with the KV
  cache and without it (the whole sequence recomputed at every step), and their ratio;
* tokens/s with the cache at each batch size of ``--batches``, as ratios to the first.

On a CPU each figure is given twice: per wall-clock second and per CPU second of this process
(``time.process_time``). On a machine shared with other jobs the wall-clock figures depend on how
much of a core the process got while each part ran; the CPU-time ones much less (the ratios are
the meaningful numbers either way). The CPU model and the load average before and after the run
are recorded with them. Prints one JSON object. Both paths produce the same tokens
(tests/gen/test_gen_model.py).
"""
from __future__ import annotations

import os
import sys

# keep benchmarks/ off sys.path; import this checkout's qlip
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from typing import Tuple  # noqa: E402

import torch  # noqa: E402

from qlip.gen.model import GenConfig, T2IModel  # noqa: E402
from qlip.nn.precision import cpu_name  # noqa: E402


def tokens_per_s(model: T2IModel, batch: int, use_cache: bool, device: torch.device, cfg: float) -> Tuple[float, float]:
    """Generated image tokens per wall-clock second and per CPU second of this process."""
    feats = torch.randn(batch, model.cfg.text_len, model.cfg.text_dim, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    model.generate(feats, cfg=cfg, top_k=100, generator=g, use_cache=use_cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    n = batch * model.cfg.num_image_tokens
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt-demo")
    ap.add_argument("--head", default="split")
    ap.add_argument("--grid", type=int, default=16)
    ap.add_argument("--text-len", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--cfg", type=float, default=4.0, help="guidance scale (!= 1 doubles the batch)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    cfg = GenConfig.from_preset(a.preset, grid_h=a.grid, grid_w=a.grid, text_len=a.text_len, text_dim=64,
                                head=a.head)
    model = T2IModel(cfg).to(device).eval()
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    tokens_per_s(model, 1, True, device, a.cfg)  # warm-up
    cached = tokens_per_s(model, a.batch, True, device, a.cfg)
    uncached = tokens_per_s(model, a.batch, False, device, a.cfg)
    sizes = [int(b) for b in a.batches.split(",")]
    scaling = {b: tokens_per_s(model, b, True, device, a.cfg) for b in sizes}
    on_cpu = device.type == "cpu"
    out = {
        "preset": a.preset, "head": a.head, "image_tokens": cfg.num_image_tokens, "text_len": a.text_len,
        "cfg": a.cfg, "device": str(device), "threads": torch.get_num_threads(), "batch": a.batch,
        "cpu": cpu_name() if on_cpu else None, "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before] if load_before else None,
        "load_average_after": [round(x, 2) for x in os.getloadavg()] if load_before else None,
        "tokens_per_s_cached": round(cached[0], 1), "tokens_per_s_uncached": round(uncached[0], 1),
        "kv_cache_speedup": round(cached[0] / uncached[0], 2),
        "batch_scaling": {str(b): {"tokens_per_s": round(v[0], 1),
                                   "ratio_to_first": round(v[0] / scaling[sizes[0]][0], 2)}
                          for b, v in scaling.items()},
    }
    if on_cpu:
        out.update({
            "tokens_per_cpu_s_cached": round(cached[1], 1), "tokens_per_cpu_s_uncached": round(uncached[1], 1),
            "kv_cache_speedup_cpu_time": round(cached[1] / uncached[1], 2),
            "batch_scaling_cpu_time": {str(b): round(v[1] / scaling[sizes[0]][1], 2) for b, v in scaling.items()},
        })
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
