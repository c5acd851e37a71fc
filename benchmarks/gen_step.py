"""Training-step and sampling speed of the qlip.gen text-to-image generator (tokens/s, MFU, images/s).

    python benchmarks/gen_step.py --device cuda [--presets gpt-b,gpt-xl] [--batch 32] [--json out.json]
    python benchmarks/gen_step.py --device cpu --smoke [--json out.json]      # gpt-tiny, seconds

Per preset (random weights; speed does not depend on them):

1. **Training**: one optimiser step = forward + backward of the next-token NLL (the ``split``
   head, 2 x 14-bit sub-tokens of 28-bit ids) on synthetic ids and text features, global-norm
   clipping and AdamW (LlamaGen's 0.9 / 0.95, wd 0.05), bf16 autocast on a GPU (``--precision``),
   as the ``t2i`` task's step. The frozen text encoder and data loading are not timed (caption
   features are computed once per caption and cached in practice). Reported: image tokens/s
   (``batch x grid^2`` per step), the step time and MFU.
2. **Sampling**: images/s of ``T2IModel.generate`` at ``--sample-batch`` (32) with the KV cache,
   CFG ``--cfg`` (4: the batch is doubled with the null condition), top-k 1000, weights and KV
   cache in bf16 on a GPU (fp32 with ``--precision fp32``).

Shapes as the GPU recipes ``t2i-gpt-b`` / ``t2i-gpt-xl``: QLIP-B/16 tokens of 256-pixel images
(a 16 x 16 grid, 256 tokens), FLAN-T5-XL caption features (width 2048, 120 tokens).

MFU (model FLOPs utilisation) = analytic training FLOPs per step / step time / peak. FLOPs per
sequence (forward; training = 3 x): ``2 x`` the matmul parameters each position goes through
(caption MLP on the ``text_len`` prefix slots; q/k/v/o and SwiGLU of every block on all
``text_len + N - 1`` slots; the visual head's output layers on the ``N`` predicting slots) plus
causal attention ``2 x S^2 x dim`` per block (``QK^T`` and ``AV``, half of the ``S x S`` scores).
Embedding look-ups, norms and softmaxes are not counted. The peak is ``--peak-tflops`` or the dense
bf16 peak of a known GPU (H100 / H200: 989 TFLOP/s); MFU is left out where neither is known (CPUs).

Writes one JSON object (``--json``) and prints a table.
"""
from __future__ import annotations

import os
import sys

# keep benchmarks/ off sys.path; import this checkout's qlip
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any, Dict, Optional  # noqa: E402

import torch  # noqa: E402

from qlip.gen.model import GenConfig, T2IModel  # noqa: E402

PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks

# (grid, text_len, text_dim): the GPU recipes' shapes, and a tiny one for --smoke
FULL_SHAPES = dict(grid=16, text_len=120, text_dim=2048)
SMOKE_SHAPES = dict(grid=4, text_len=8, text_dim=32)


def peak_tflops(device_name: str, given: Optional[float]) -> Optional[float]:
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def train_flops_per_sequence(cfg: GenConfig) -> float:
    """Analytic training FLOPs of one sequence (3 x forward; see the module docstring)."""
    L, N, C = cfg.text_len, cfg.num_image_tokens, cfg.dim
    S = L + N - 1
    bb = cfg.backbone_config()
    attn = C * bb.n_heads * bb.head_size * 2 + C * bb.kv_heads * bb.head_size * 2   # q, o and k, v
    block = attn + 3 * C * cfg.ffn_hidden                                            # + SwiGLU
    head = {"split": (1 << (cfg.bits // cfg.groups)) * cfg.groups * C, "bitwise": 2 * cfg.bits * C,
            "intra": (1 << (cfg.bits // cfg.groups)) * cfg.groups * C + (cfg.groups - 1) * 4 * C * C}[cfg.head]
    forward = (2 * L * (cfg.text_dim * C + C * C)
               + 2 * S * block * cfg.n_layers
               + 2 * S * S * C * cfg.n_layers
               + 2 * N * head)
    return 3.0 * forward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_speed(cfg: GenConfig, batch: int, steps: int, warmup: int, device: torch.device, precision: str,
                compile_blocks: bool) -> Dict[str, Any]:
    """Image tokens/s of full optimiser steps (forward, backward, clip, AdamW)."""
    torch.manual_seed(0)
    model = T2IModel(cfg).to(device).train()
    if compile_blocks:  # as train.compile: every decoder block on its own
        for unit in model.fsdp_units():
            unit.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            fused=device.type == "cuda")
    feats = torch.randn(batch, cfg.text_len, cfg.text_dim, device=device)
    ids = torch.randint(0, 1 << cfg.bits, (batch, cfg.num_image_tokens), device=device)
    drop = torch.rand(batch, device=device) < 0.1

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, precision):
            loss = model(feats, ids, drop)
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    return {"step_s": dt, "tokens_per_s": batch * cfg.num_image_tokens / dt, "loss": loss,
            "train_flops_per_step": batch * train_flops_per_sequence(cfg),
            "params": sum(p.numel() for p in params)}


@torch.no_grad()
def sample_speed(cfg: GenConfig, batch: int, device: torch.device, precision: str, cfg_scale: float) -> Dict[str, Any]:
    """Images/s of KV-cached sampling (one warm-up image first). bf16: the weights and the KV cache
    in bf16 (autocast would re-cast every weight at every step); logits are float32 either way."""
    torch.manual_seed(0)
    model = T2IModel(cfg).to(device).eval()
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    model.generate(torch.randn(1, cfg.text_len, cfg.text_dim, device=device), cfg=cfg_scale, top_k=1000, generator=g)
    feats = torch.randn(batch, cfg.text_len, cfg.text_dim, device=device)
    _sync(device)
    t0 = time.perf_counter()
    model.generate(feats, cfg=cfg_scale, top_k=1000, generator=g)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"sample_batch": batch, "cfg": cfg_scale, "sample_s": dt, "images_per_s": batch / dt,
            "sample_tokens_per_s": batch * cfg.num_image_tokens / dt}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="gpt-tiny on tiny shapes, fp32, a few seconds on a CPU")
    ap.add_argument("--presets", default=None, help="comma-separated (default gpt-b,gpt-xl; --smoke: gpt-tiny)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 32; --smoke: 4)")
    ap.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default 32; --smoke: 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; --smoke: 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; --smoke: 1)")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                    help="default: bf16 autocast on a GPU, fp32 on a CPU")
    ap.add_argument("--cfg", type=float, default=4.0, help="guidance scale of the sampling measurement")
    ap.add_argument("--compile", action="store_true", help="torch.compile every decoder block (train.compile)")
    ap.add_argument("--no-sample", action="store_true", help="skip the sampling measurement")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak of the device for MFU (default: known GPUs' dense bf16 peak; none on CPU)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gen_step.py: --device cuda but no CUDA GPU is visible (use --device cpu --smoke)", file=sys.stderr)
        return 2
    smoke = a.smoke
    presets = (a.presets or ("gpt-tiny" if smoke else "gpt-b,gpt-xl")).split(",")
    shapes = SMOKE_SHAPES if smoke else FULL_SHAPES
    batch = a.batch or (4 if smoke else 32)
    sample_batch = a.sample_batch or (2 if smoke else 32)
    steps, warmup = a.steps or (2 if smoke else 10), a.warmup if a.warmup is not None else (1 if smoke else 3)
    precision = a.precision or ("bf16" if device.type == "cuda" else "fp32")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(device_name, a.peak_tflops)

    rows = []
    for preset in presets:
        cfg = GenConfig.from_preset(preset, grid_h=shapes["grid"], grid_w=shapes["grid"], text_len=shapes["text_len"],
                                    text_dim=shapes["text_dim"], head="split")
        row: Dict[str, Any] = {"preset": preset, "precision": precision, "batch": batch,
                               "image_tokens": cfg.num_image_tokens, "text_len": cfg.text_len,
                               "seq_len": cfg.text_len + cfg.num_image_tokens - 1, "compile": a.compile}
        try:
            row.update(train_speed(cfg, batch, steps, warmup, device, precision, a.compile))
            if peak:
                row["mfu"] = row["train_flops_per_step"] / row["step_s"] / (peak * 1e12)
            if not a.no_sample:
                row.update(sample_speed(cfg, sample_batch, device, precision, a.cfg))
        except torch.cuda.OutOfMemoryError as e:  # a subclass of RuntimeError; keep the other presets
            row["error"] = f"out of memory: {str(e).splitlines()[0][:120]}"
        if device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.empty_cache()
        rows.append(row)

    ok = [r for r in rows if "error" not in r]
    result = {"device": str(device), "device_name": device_name, "torch": torch.__version__, "smoke": smoke,
              "threads": torch.get_num_threads(), "peak_tflops": peak, "steps": steps, "warmup": warmup,
              "rows": rows,
              # the first preset's figure, for one-line summaries
              "tokens_per_s": ok[0]["tokens_per_s"] if ok else None,
              "note": (f"{ok[0]['preset']} {precision} b{batch}" if ok else "failed")
              + (", smoke sizes (gpt-tiny, 16 tokens)" if smoke else "")}
    print(f"{'preset':<10}{'prec':<6}{'batch':>6}{'tokens/s':>12}{'step s':>10}{'MFU':>8}{'img/s':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:<10}{r['precision']:<6}{r['batch']:>6}  {r['error']}")
            continue
        mfu = f"{r['mfu'] * 100:7.1f}%" if "mfu" in r else f"{'-':>8}"
        ips = f"{r['images_per_s']:9.2f}" if "images_per_s" in r else f"{'-':>9}"
        print(f"{r['preset']:<10}{r['precision']:<6}{r['batch']:>6}{r['tokens_per_s']:12.0f}{r['step_s']:10.3f}"
              f"{mfu}{ips}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
