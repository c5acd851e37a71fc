#!/usr/bin/env python
"""Where bf16 pays on this CPU: matmul, attention and the demos' training steps, in one run.

    python benchmarks/cpu_bf16.py                  # ~2-3 min on one thread
    python benchmarks/cpu_bf16.py --quick          # fewer repeats, smaller matmul (tests; ~20 s)

Everything on ``--threads`` torch threads (default 1: what one lane of the demos gets), in one
process, so that every ratio compares measurements of the same run:

1. **matmul**: a 2048^3 (``--quick``: 512^3) ``torch.mm`` in fp32 and in bf16, and what
   ``precision: auto`` resolves to here (``qlip.nn.precision``: AMX, or ``avx512_bf16`` with a
   measured bf16/fp32 matmul ratio >= 1.5).
2. **attention** (``qlip.nn.causal_attention.sdpa``, forward + backward) at the t2i demo generator's
   shape (batch 64, 4 heads, 80 positions, head size 64) and at 256 positions: bf16 inputs through
   torch's bf16 CPU kernel against the same inputs computed in fp32 (what ``sdpa`` does with bf16 on
   a CPU without AMX).
3. **the t2i demo's generator step** (``gpt-demo``, the ``intra`` head over 4 x 7 bits, an 8 x 8 grid,
   a 16-slot caption prefix of features; batch 64; forward, backward, clipping, AdamW; synthetic ids):
   fp32, bf16 autocast, and bf16 autocast with the bf16 attention kernel.
4. **the QLIP demo's stage-1 and stage-2 steps** (``qlip/configs/demo-stage{1,2}.yaml``, synthetic
   batches through the real ``Engine``): fp32 against bf16 autocast.

Each timing is the best of ``--repeats`` rounds (fp32 and bf16 alternate round by round, so that a
load change on a shared machine hits both). Prints a table of times and ratios (> 1: bf16 faster)
and writes ``--json``.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List  # noqa: E402

import torch  # noqa: E402
import yaml  # noqa: E402

REPO = os.path.dirname(_HERE)


def _best(fns: Dict[str, Callable[[], None]], repeats: int, inner: int) -> Dict[str, float]:
    """Best-of-``repeats`` seconds per call of each function, the functions alternating per round."""
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t) / inner)
    return best


def matmul(n: int, repeats: int) -> Dict[str, float]:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    ab, bb = a.bfloat16(), b.bfloat16()
    t = _best({"fp32": lambda: torch.mm(a, b), "bf16": lambda: torch.mm(ab, bb)}, repeats, 2)
    return {"n": n, **{f"{k}_gflops": 2 * n ** 3 / v / 1e9 for k, v in t.items()}}


def attention(shape, repeats: int) -> Dict[str, float]:
    import qlip.nn.causal_attention as CA
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*shape, generator=g).bfloat16().requires_grad_() for _ in range(3))
    orig = CA._upcast_on_this_cpu

    def run(upcast: bool) -> Callable[[], None]:
        def fn():
            CA._upcast_on_this_cpu = (lambda _q: True) if upcast else (lambda _q: False)
            try:
                CA.sdpa(q, k, v, is_causal=True).float().sum().backward()
            finally:
                CA._upcast_on_this_cpu = orig
        return fn
    t = _best({"bf16_kernel": run(False), "fp32_upcast": run(True)}, repeats, 2)
    return {"shape": list(shape), **{f"{k}_ms": v * 1e3 for k, v in t.items()}}


def generator_step(repeats: int, batch: int) -> Dict[str, float]:
    import contextlib

    import qlip.nn.causal_attention as CA
    from qlip.gen.model import PRESETS, GenConfig, T2IModel
    cfg = GenConfig(**PRESETS["gpt-demo"], bits=28, grid_h=8, grid_w=8, head="intra", groups=4, text_dim=128,
                    text_len=16)
    torch.manual_seed(0)
    model = T2IModel(cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    feats = torch.randn(batch, cfg.text_len, cfg.text_dim)
    ids = torch.randint(0, 1 << cfg.bits, (batch, cfg.num_image_tokens))
    drop = torch.rand(batch) < 0.1
    orig = CA._upcast_on_this_cpu

    def step(precision: str, bf16_kernel: bool = False) -> Callable[[], None]:
        def fn():
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            if bf16_kernel:
                CA._upcast_on_this_cpu = lambda _q: False
            try:
                opt.zero_grad(set_to_none=True)
                with ctx:
                    loss = model(feats, ids, drop)
                loss.float().backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            finally:
                CA._upcast_on_this_cpu = orig
        return fn
    t = _best({"fp32": step("fp32"), "bf16": step("bf16"), "bf16_attention_kernel": step("bf16", True)}, repeats, 2)
    return {"batch": batch, **{f"{k}_s": v for k, v in t.items()}}


def qlip_step(stage: int, repeats: int) -> Dict[str, float]:
    from qlip.model import get_preset
    from qlip.train import Engine, Recipe
    spec = importlib.util.spec_from_file_location("qlip_bench_train_step", os.path.join(_HERE, "train_step.py"))
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    with open(os.path.join(REPO, "qlip", "configs", f"demo-stage{stage}.yaml"), encoding="utf-8") as f:
        d = yaml.safe_load(f)
    d["data"] = {"batch_size": d["data"]["batch_size"]}
    d["model"] = {"preset": "qlip-demo", "overrides": {"vision.stem": "conv", "vision.depth": 1}}
    d["train"].update(progress=False, tensorboard=False, ckpt_every=0)
    batch = ts.make_batch(get_preset("qlip-demo"), d["data"]["batch_size"])
    engines, its = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for prec in ("fp32", "bf16"):
            d["train"]["precision"] = prec
            torch.manual_seed(0)
            e = Engine(Recipe.from_dict(d), os.path.join(tmp, prec), loader=ts.SyntheticBatches(batch))
            e.task.train_mode(e.model)
            engines[prec], its[prec] = e, iter(ts.SyntheticBatches(batch))
        t = _best({p: (lambda p=p: engines[p].run_step(its[p])) for p in engines}, repeats, 2)
    return {"stage": stage, "batch": d["data"]["batch_size"], **{f"{k}_s": v for k, v in t.items()}}


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="512^3 matmul, 1 repeat, batch 8, no QLIP steps")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from qlip.nn.precision import cpu_flags, cpu_name, resolve_precision
    reps = 1 if a.quick else a.repeats
    flags = cpu_flags()
    out = {"cpu": cpu_name() or platform.processor() or "unknown", "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
           "threads": a.threads, "torch": torch.__version__, "auto": str(resolve_precision("auto", "cpu")),
           "matmul": matmul(512 if a.quick else 2048, reps),
           "attention": [attention(s, reps) for s in ([(8, 4, 80, 64)] if a.quick else
                                                      [(64, 4, 80, 64), (32, 4, 256, 64)])],
           "generator_step": generator_step(reps, 8 if a.quick else 64)}
    if not a.quick:
        out["qlip_steps"] = [qlip_step(1, reps), qlip_step(2, reps)]
    m = out["matmul"]
    print(f"CPU: {out['cpu']} (amx_bf16 {out['amx_bf16']}, avx512_bf16 {out['avx512_bf16']}), "
          f"{a.threads} thread(s), torch {out['torch']}")
    print(f"precision auto here: {out['auto']}")
    print(f"matmul {m['n']}^3: fp32 {m['fp32_gflops']:.1f} GFLOP/s, bf16 {m['bf16_gflops']:.1f} GFLOP/s "
          f"(bf16/fp32 {m['bf16_gflops'] / m['fp32_gflops']:.2f}x)")
    for r in out["attention"]:
        print(f"attention fwd+bwd {tuple(r['shape'])}: bf16 kernel {r['bf16_kernel_ms']:.1f} ms, "
              f"in fp32 {r['fp32_upcast_ms']:.1f} ms (fp32 {r['bf16_kernel_ms'] / r['fp32_upcast_ms']:.2f}x faster)")
    gs = out["generator_step"]
    print(f"t2i generator step (batch {gs['batch']}): fp32 {gs['fp32_s']:.3f} s, bf16 {gs['bf16_s']:.3f} s "
          f"({gs['fp32_s'] / gs['bf16_s']:.2f}x), bf16 with the bf16 attention kernel "
          f"{gs['bf16_attention_kernel_s']:.3f} s ({gs['fp32_s'] / gs['bf16_attention_kernel_s']:.2f}x)")
    for r in out.get("qlip_steps", []):
        print(f"QLIP demo stage-{r['stage']} step (batch {r['batch']}): fp32 {r['fp32_s']:.3f} s, "
              f"bf16 {r['bf16_s']:.3f} s ({r['fp32_s'] / r['bf16_s']:.2f}x)")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
