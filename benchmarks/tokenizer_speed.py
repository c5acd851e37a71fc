#!/usr/bin/env python
"""Throughput of tokenize + detokenize for QLIP-B-16-256 (random weights), fp32 vs bf16.

    python benchmarks/tokenizer_speed.py [--batch-sizes 1 4] [--repeats 3] [--threads N] [--json OUT]

For every batch size it times ``ids = model.tokenize(x); y = model.detokenize(ids)`` under
``torch.inference_mode()`` in three precisions:

* ``fp32``          float32 weights and activations;
* ``bf16-autocast`` float32 weights, ``torch.autocast("cpu", torch.bfloat16)`` (the CLI's ``--bf16``);
* ``bf16-cast-once`` ``qlip.load(..., precision="bf16")``: weights cast to bfloat16 once, the pre-sign
                    projection (``bottleneck.down``) kept in float32 (``qlip.model.precision``).

It also prints what ``precision="auto"`` chooses on this machine (bf16 only with AMX or a GPU).

Rounds are interleaved (every round runs each precision and each batch size once) and every model
run is bracketed by a large square matmul in fp32 and in bf16. Times are medians over rounds; the
ratios (model GFLOP/s over the matmul's, bf16 speed-up over fp32) are formed within a round and then
the median is taken, so a noisy shared machine (load that drifts over minutes) hurts them least. Model FLOPs are counted analytically (all matmuls, the patch-embedding conv and
the attention score/value products; 2 FLOPs per multiply-add) and cross-checked against
``torch.utils.flop_counter.FlopCounterMode`` (which sees the linear layers and the conv but not CPU
SDPA). "GFLOP/s" is that count divided by the median wall time.

Accuracy of bf16 against fp32 is measured on real photographs (scikit-image sample images through
``model.preprocess``): the fraction of equal id bits over all tokens
(``model.quantizer.ids_to_bits``), the PSNR between the bf16 and the fp32 reconstructions of the
same image (end to end, and detokenizing the same fp32 ids). Images are compared in [0, 1] pixel
space (``postprocess`` conventions: de-normalised and clamped), peak 1.
"""
from __future__ import annotations

import os
import sys

# keep benchmarks/ off sys.path; import this checkout's qlip
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))  # the repository root: this checkout's qlip

import argparse
import contextlib
import copy
import json
import math
import platform
import statistics
import time

WAIT_POLICIES = ("passive", "active", "default")


def apply_omp_wait_policy(argv):
    """``--omp-wait-policy``: GNU OpenMP reads OMP_WAIT_POLICY once, when torch loads it, so this
    runs before ``import torch``. Without the flag an OMP_WAIT_POLICY already in the environment is
    kept, else PASSIVE is used (see docs/performance.md: on an oversubscribed CPU spinning OpenMP
    threads make a many-kernel model several times slower, a single big matmul hardly)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--omp-wait-policy", choices=WAIT_POLICIES)
    choice = p.parse_known_args(argv)[0].omp_wait_policy
    if choice is None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    elif choice == "default":
        os.environ.pop("OMP_WAIT_POLICY", None)
    else:
        os.environ["OMP_WAIT_POLICY"] = choice.upper()


if __name__ == "__main__":
    apply_omp_wait_policy(sys.argv[1:])

import torch  # noqa: E402

import qlip  # noqa: E402
from qlip.model.precision import cast_for_inference  # noqa: E402
from qlip.nn.precision import cpu_has_amx_bf16, resolve_precision  # noqa: E402
from qlip.model.preprocess import denormalize  # noqa: E402

PRESET = "qlip-b-16-256"
MODES = ("fp32", "bf16-autocast", "bf16-cast-once")
SAMPLES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "hubble_deep_field",
           "immunohistochemistry", "retina", "colorwheel", "moon", "page")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], metavar="B")
    p.add_argument("--preset", default=PRESET, help=f"random-init preset to time (default {PRESET})")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round); default 3")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n reference matmul")
    p.add_argument("--json", metavar="OUT", help="also write every sample and summary to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-wait-policy", choices=WAIT_POLICIES,
                   help="OMP_WAIT_POLICY for this run (default: the environment's, else passive; "
                        "'default' = the OpenMP runtime's own, i.e. spin first)")
    return p.parse_args(argv)


# ---- inputs ----------------------------------------------------------------------------------
def sample_images(n):
    """``n`` RGB PIL images from scikit-image's bundled samples (cycled if n is larger)."""
    import warnings

    import numpy as np
    import skimage.data
    from PIL import Image
    out = []
    for name in SAMPLES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = getattr(skimage.data, name)()
        except Exception:  # a sample that needs a download: skip it
            continue
        a = np.asarray(a)
        if a.dtype != np.uint8:
            a = (a.astype(np.float64) / max(a.max(), 1) * 255).astype(np.uint8)
        out.append((name, Image.fromarray(a[..., :3] if a.ndim == 3 else a)))
    if not out:
        raise SystemExit("no scikit-image sample image could be loaded")
    return [out[i % len(out)] for i in range(n)]


# ---- FLOPs -----------------------------------------------------------------------------------
def tower_flops(b, n_tokens):
    """Matmul FLOPs of one transformer tower on one image (2 per multiply-add)."""
    D, F, N = b.width, b.mlp_dim, n_tokens
    mlp = (3 if b.swiglu else 2) * D * F
    linear = 2 * N * (3 * D * D + D * D + mlp)
    attention = 2 * 2 * N * N * D               # q k^T and attn @ v
    return b.depth * linear, b.depth * attention


def analytic_flops(cfg):
    """FLOPs of tokenize and detokenize of one image: dict with the matmul / attention split."""
    v, d, q = cfg.vision, cfg.decoder, cfg.quantizer
    n = cfg.grid ** 2
    enc_lin, enc_att = tower_flops(v, n + 1)
    dec_lin, dec_att = tower_flops(d, n)
    patch = 2 * n * 3 * v.patch_size ** 2 * v.width
    down = 2 * n * (v.width * v.width + v.width * q.bits) if q.embed_type == "mlp" else 0
    up = 2 * n * (q.bits * d.width + d.width * d.width) if q.embed_type == "mlp" else 0
    hidden = d.head_dim or d.mlp_dim
    head = 2 * n * (d.width * hidden + hidden * 3 * v.patch_size ** 2)
    tok = dict(linear_conv=patch + enc_lin + down, attention=enc_att)
    detok = dict(linear_conv=up + dec_lin + head, attention=dec_att)
    total = sum(tok.values()) + sum(detok.values())
    return dict(tokenize=tok, detokenize=detok, total=total,
                linear_conv=tok["linear_conv"] + detok["linear_conv"],
                attention=tok["attention"] + detok["attention"])


def counted_flops(model, x):
    """FlopCounterMode's count of tokenize + detokenize (linear and conv; CPU SDPA is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model.detokenize(model.tokenize(x))
    counts = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return fc.get_total_flops(), counts


# ---- timing ----------------------------------------------------------------------------------
def run_model(model, x, autocast):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        ids = model.tokenize(x)
        y = model.detokenize(ids)
    return ids, y


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def psnr(a, b, mean, std):
    a01 = denormalize(a.float(), mean, std).clamp(0, 1)
    b01 = denormalize(b.float(), mean, std).clamp(0, 1)
    mse = (a01 - b01).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def fmt(v, width, prec):
    return f"{'-':>{width}}" if v is None else f"{v:>{width}.{prec}f}"


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    load0 = os.getloadavg()

    model = qlip.load(args.preset, pretrained=False).eval()
    model.drop_text()                        # tokenize/detokenize never touch the text tower
    models = {"fp32": model, "bf16-autocast": model,
              "bf16-cast-once": cast_for_inference(copy.deepcopy(model), "bf16")}
    autocast = {"fp32": False, "bf16-autocast": True, "bf16-cast-once": False}

    bmax = max(args.batch_sizes)
    names_imgs = sample_images(bmax)
    x_all = model.preprocess([im for _, im in names_imgs])
    xs = {b: x_all[:b].contiguous() for b in args.batch_sizes}

    flops = analytic_flops(model.config)
    counted, counted_by_op = counted_flops(model, xs[min(args.batch_sizes)])
    counted_per_image = counted / min(args.batch_sizes)

    n = args.matmul_size
    mats = {dt: (torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)) for dt in (torch.float32, torch.bfloat16)}
    mm_flops = 2 * n ** 3

    def matmul(dt):
        a, b = mats[dt]
        return torch.mm(a, b)

    # warm-up round; its outputs (all images at the largest batch) give the accuracy numbers
    for dt in mats:
        matmul(dt)
    outputs = {}
    for b in args.batch_sizes:
        for mode in MODES:
            outputs[(mode, b)] = run_model(models[mode], xs[b].to(models[mode].dtype), autocast[mode])

    # timed rounds: each model run is bracketed by reference matmuls, and every ratio (model rate /
    # matmul rate, bf16 / fp32 speed) is formed within a round, then the median over rounds is taken
    samples = {("matmul", "fp32"): [], ("matmul", "bf16"): []}
    samples.update({(mode, b): [] for b in args.batch_sizes for mode in MODES})
    paired = {(mode, b): dict(fp32=[], own=[], speedup=[]) for b in args.batch_sizes for mode in MODES}

    def matmul_rates():
        rates = {}
        for dt, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            t = timed(lambda: matmul(dt))[0]
            samples[("matmul", key)].append(t)
            rates[key] = mm_flops / t / 1e9
        return rates

    for _ in range(args.repeats):
        for b in args.batch_sizes:
            around, times = [matmul_rates()], {}
            for mode in MODES:
                x = xs[b].to(models[mode].dtype)
                times[mode] = timed(lambda: run_model(models[mode], x, autocast[mode]))[0]
                samples[(mode, b)].append(times[mode])
                around.append(matmul_rates())
            for i, mode in enumerate(MODES):
                ref = {k: (around[i][k] + around[i + 1][k]) / 2 for k in ("fp32", "bf16")}
                rate = flops["total"] * b / times[mode] / 1e9
                paired[(mode, b)]["fp32"].append(rate / ref["fp32"])
                paired[(mode, b)]["own"].append(rate / ref["fp32" if mode == "fp32" else "bf16"])
                paired[(mode, b)]["speedup"].append(times["fp32"] / times[mode])

    med = {k: statistics.median(v) for k, v in samples.items()}
    mm = {k: mm_flops / med[("matmul", k)] / 1e9 for k in ("fp32", "bf16")}

    # accuracy of bf16 vs fp32 on the sample images
    ids32, y32 = outputs[("fp32", bmax)]
    bits = model.quantizer.ids_to_bits
    mean, std = model.image_mean, model.image_std
    with torch.inference_mode():
        b32 = bits(ids32)
    accuracy = {}
    for mode in MODES[1:]:
        ids_m, y_m = outputs[(mode, bmax)]
        with torch.inference_mode():
            agree = (bits(ids_m) == b32).double().mean().item()
            tok_equal = (ids_m == ids32).double().mean().item()
            if autocast[mode]:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    y_ids = models[mode].detokenize(ids32)
            else:
                y_ids = models[mode].detokenize(ids32)
        accuracy[mode] = dict(bit_agreement=agree, token_agreement=tok_equal,
                              psnr_end_to_end=psnr(y_m, y32, mean, std),
                              psnr_same_ids=psnr(y_ids, y32, mean, std))

    rows = []
    for b in args.batch_sizes:
        for mode in MODES:
            t = med[(mode, b)]
            pr = {k: statistics.median(v) for k, v in paired[(mode, b)].items()}
            rows.append(dict(mode=mode, batch=b, seconds=t, images_per_s=b / t, gflops=flops["total"] * b / t / 1e9,
                             frac_of_fp32_matmul=pr["fp32"], frac_of_own_matmul=pr["own"],
                             speedup_vs_fp32=pr["speedup"], paired_per_round=paired[(mode, b)],
                             bit_agreement=accuracy.get(mode, {}).get("bit_agreement"),
                             psnr=accuracy.get(mode, {}).get("psnr_end_to_end"),
                             samples=samples[(mode, b)]))

    # ---- report -----------------------------------------------------------------------------
    print(f"QLIP {args.preset} (random weights), tokenize+detokenize, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, "
          f"{args.repeats} timed rounds (+1 warm-up)")
    print("times, img/s, GFLOP/s: medians over rounds; /mm (model GFLOP/s over the reference matmul's, fp32 or "
          "the mode's own dtype) and speed-up (over fp32): medians of per-round ratios, each model run being "
          "bracketed by matmuls")
    print(f"FLOPs/image (analytic): {flops['total'] / 1e9:.2f} G = linear+conv {flops['linear_conv'] / 1e9:.2f} G "
          f"+ attention {flops['attention'] / 1e9:.2f} G; FlopCounterMode (linear+conv only): "
          f"{counted_per_image / 1e9:.2f} G")
    print(f"reference matmul {n}x{n}x{n}: fp32 {mm['fp32']:.1f} GFLOP/s, bf16 {mm['bf16']:.1f} GFLOP/s "
          f"(bf16/fp32 = {mm['bf16'] / mm['fp32']:.2f}x)")
    print(f"precision auto on this machine (CPU): {resolve_precision('auto', 'cpu')}; "
          f"amx_bf16 in /proc/cpuinfo: {cpu_has_amx_bf16()}")
    print(f"accuracy images: {', '.join(nm for nm, _ in names_imgs)}")
    hdr = (f"{'mode':<14}{'batch':>6}{'s/batch':>10}{'img/s':>8}{'GFLOP/s':>9}{'/mm fp32':>9}"
           f"{'/mm own':>9}{'speed-up':>9}{'bits eq':>9}{'PSNR dB':>9}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['mode']:<14}{r['batch']:>6}{r['seconds']:>10.3f}{r['images_per_s']:>8.2f}{r['gflops']:>9.1f}"
              f"{r['frac_of_fp32_matmul']:>9.2f}{r['frac_of_own_matmul']:>9.2f}{r['speedup_vs_fp32']:>8.2f}x"
              f"{fmt(r['bit_agreement'], 9, 4)}{fmt(r['psnr'], 9, 1)}")
    for mode, a in accuracy.items():
        print(f"{mode}: {a['bit_agreement'] * 100:.2f}% of id bits and {a['token_agreement'] * 100:.1f}% of tokens "
              f"equal to fp32; PSNR vs fp32 reconstruction {a['psnr_end_to_end']:.1f} dB end to end, "
              f"{a['psnr_same_ids']:.1f} dB detokenizing the fp32 ids")
    print("targets:")
    for b in args.batch_sizes:
        r32 = next(r for r in rows if r["mode"] == "fp32" and r["batch"] == b)
        frac = r32["frac_of_fp32_matmul"]
        verdict = "MET" if frac >= 0.8 else "NEAR (within 5 points)" if frac >= 0.75 else "NOT MET"
        print(f"  (a) B={b}: fp32 reaches {frac * 100:.0f}% of the fp32 matmul rate (target ~80%): {verdict}")
    for b in args.batch_sizes:
        for mode in MODES[1:]:
            r = next(r for r in rows if r["mode"] == mode and r["batch"] == b)
            ok = r["speedup_vs_fp32"] >= 3 and r["bit_agreement"] >= 0.99
            print(f"  (b) B={b} {mode}: {r['speedup_vs_fp32']:.2f}x fp32 with {r['bit_agreement'] * 100:.2f}% bits "
                  f"(target >= 3x, >= 99%): {'MET' if ok else 'NOT MET'}")
    print(f"  bf16 matmul / fp32 matmul on this machine: {mm['bf16'] / mm['fp32']:.2f}x "
          "(bounds what bf16 can gain over fp32 in a matmul-bound model)")
    load1 = os.getloadavg()
    elapsed = time.perf_counter() - t_start
    print(f"load average {load0[0]:.2f} -> {load1[0]:.2f} on {os.cpu_count()} CPUs; wall time {elapsed:.0f} s")

    if args.json:
        out = dict(preset=args.preset, auto_precision=resolve_precision("auto", "cpu").name, torch=torch.__version__, threads=torch.get_num_threads(), repeats=args.repeats,
                   omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                   batch_sizes=args.batch_sizes, machine=platform.machine(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), loadavg_before=load0, loadavg_after=load1, wall_seconds=elapsed,
                   flops_per_image=flops, flop_counter_per_image=counted_per_image,
                   flop_counter_ops={k: v / min(args.batch_sizes) for k, v in counted_by_op.items()},
                   matmul=dict(n=n, gflops=mm, bf16_over_fp32=mm["bf16"] / mm["fp32"],
                               samples={k: samples[("matmul", k)] for k in ("fp32", "bf16")}),
                   rows=rows, accuracy=accuracy, accuracy_images=[nm for nm, _ in names_imgs])
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
