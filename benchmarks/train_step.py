"""Stage-1 training-step benchmark of the qlip trainer.

1. Throughput of one optimiser step (forward + backward of MSE + BSQ + InfoNCE, global-norm
   clipping, LAMB) in fp32 and under bf16 autocast, for the ``qlip-tiny`` and ``qlip-b-16-256``
   presets (B-16 at a small batch), with the peak memory of the step.
2. The largest contrastive batch whose step fits a memory cap (``--mem-cap-mb``), plain and with
   gradient caching (``train.contrastive_chunk``), found by doubling + bisection.

Every configuration runs in its own subprocess, so that memory is measured per configuration:
on CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs just before the first
step; ``ru_maxrss`` where that is not possible) minus the resident set before the first step
(= gradients + optimiser state + activations + logits of the step; the model weights and the
input batch are excluded); on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation
before the first step. tracemalloc does not see torch's allocations. The steps use the real
``Trainer`` (``_micro_step`` + clipping + optimiser) on synthetic batches (random pixels,
random captions tokens ending in eos), so data loading is not timed.

    python benchmarks/train_step.py                              # everything, a few minutes on 2 cores
    python benchmarks/train_step.py --presets qlip-tiny --no-max-batch
    python benchmarks/train_step.py --mem-cap-mb 512 --chunk 32 --json out.json
    python benchmarks/train_step.py --presets qlip-b-16-256 --precisions bf16 --grad-checkpointing both \
        --batch-large 64 --no-max-batch                          # a GPU (benchmarks/gpu.sh)

MFU (model FLOPs utilisation) = analytic training FLOPs per image (3 x the forward matmul and attention
FLOPs of vision encoder, bottleneck, decoder and text tower; gradient-checkpointing recomputation is
not counted) x images/s / peak. The peak is ``--peak-tflops``, or the dense bf16 peak of a known GPU
(H100/H200: 989 TFLOP/s); MFU is left out where neither is known (CPUs).

Prints a table and the ratios bf16/fp32 speed and cached/plain max batch.
"""
from __future__ import annotations

import os
import sys

# keep benchmarks/ off sys.path (its scripts are not modules of this program)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the worker (one configuration, in a subprocess) ----------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (VmHWM; Linux >= 4.0), so that the peak
    measured afterwards is that of the step and not of an earlier import or model build."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux (never reset)


class SyntheticBatches:
    """The trainer's loader interface over one fixed synthetic batch."""

    def __init__(self, batch):
        self.batch, self.stats = batch, {"skipped": 0}

    def __iter__(self):
        while True:
            yield self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def make_batch(cfg, n: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    t = cfg.text
    tokens = torch.zeros(n, t.context_length, dtype=torch.long)
    lengths = torch.randint(5, 20, (n,), generator=g)
    for i, L in enumerate(lengths.tolist()):
        tokens[i, 0] = t.vocab_size - 2  # sot
        tokens[i, 1:L] = torch.randint(1, t.vocab_size - 2, (L - 1,), generator=g)
        tokens[i, L] = t.eos_token_id
    return {"images": images, "tokens": tokens}


def worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    from qlip.model import get_preset
    from qlip.train import Engine, Recipe

    dev = spec["device"]
    cfg = get_preset(spec["preset"])
    recipe = Recipe.from_dict({
        "model": {"preset": spec["preset"], "grad_checkpointing": bool(spec.get("ckpt", False))},
        "optim": {"optimizer": "lamb", "lr": 1e-4, "warmup_steps": 0, "steps": 10 ** 6},
        "loss": {"alpha_r": 1.0, "alpha_q": 1.0, "alpha_a": 1.0},
        "train": {"precision": spec["precision"], "contrastive_chunk": spec["chunk"], "progress": False,
                  "tensorboard": False, "device": dev},
    })
    batch = make_batch(cfg, spec["batch"])
    with tempfile.TemporaryDirectory() as tmp:
        tr = Engine(recipe, tmp, loader=SyntheticBatches(batch))
        tr.task.train_mode(tr.model)
        batches = iter(SyntheticBatches({k: v.to(tr.device) for k, v in batch.items()}))  # no copies in the timing
        cuda = tr.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2 ** 20
        else:
            _reset_peak_rss()
            base = _rss_mb()

        def step():  # one optimizer step of the engine: schedule, forward/backward, clip, update
            tr.run_step(batches)
            if cuda:
                torch.cuda.synchronize()

        times = []
        for i in range(spec["warmup"] + spec["steps"]):
            t0 = time.perf_counter()
            step()
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t0)
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2 ** 20
        else:
            peak = _peak_rss_mb()
    out = {k: spec[k] for k in ("preset", "precision", "batch", "chunk", "threads")}
    out["ckpt"] = bool(spec.get("ckpt", False))
    out["device"] = str(tr.device)
    out["device_name"] = torch.cuda.get_device_name(tr.device) if cuda else "cpu"
    out["train_flops_per_img"] = train_flops_per_image(cfg)
    if times:
        s = statistics.median(times)
        out.update(step_s=s, img_per_s=spec["batch"] / s)
    out.update(step_mem_mb=peak - base, peak_mb=peak)
    return out


def train_flops_per_image(cfg) -> float:
    """3 x the analytic forward FLOPs of one image-text pair (matmuls, convs, attention products)."""
    def tower(b, n):
        mlp = (3 if b.swiglu else 2) * b.width * b.mlp_dim
        return b.depth * (2 * n * (4 * b.width ** 2 + mlp) + 4 * n * n * b.width)
    v, d, q, t = cfg.vision, cfg.decoder, cfg.quantizer, cfg.text
    n = cfg.grid ** 2
    f = tower(v, n + 1) + 2 * n * 3 * v.patch_size ** 2 * v.width + 2 * v.width * cfg.embed_dim
    if q.embed_type == "mlp":
        f += 2 * n * (v.width ** 2 + v.width * q.bits + q.bits * d.width + d.width ** 2)
    hidden = d.head_dim or d.mlp_dim
    f += tower(d, n) + 2 * n * (d.width * hidden + hidden * 3 * v.patch_size ** 2)
    if t is not None:
        f += tower(t, t.context_length) + 2 * t.width * cfg.embed_dim
    return 3.0 * f


PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def peak_tflops(device_name: str, given):
    if given:
        return given
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


# ---- the driver -------------------------------------------------------------------------------
def run_config(spec: dict, timeout: float = 900) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], env=env,
                       capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if p.returncode != 0:
        return {**spec, "error": (p.stderr.strip().splitlines() or ["killed"])[-1], "returncode": p.returncode}
    return json.loads(p.stdout.strip().splitlines()[-1])


def max_batch(base: dict, cap_mb: float, start: int, limit: int, log) -> tuple:
    """Largest batch whose step memory is <= cap_mb (doubling, then bisection to ~6%)."""
    probes = []

    def fits(b):
        r = run_config({**base, "batch": b})
        ok = "error" not in r and r["step_mem_mb"] <= cap_mb
        probes.append((b, round(r.get("step_mem_mb", float("nan")), 1), ok))
        log(f"    chunk={base['chunk']:<4} batch={b:<6} step memory {r.get('step_mem_mb', float('nan')):8.1f} MB"
            f" {'fits' if ok else 'over the cap' if 'error' not in r else r['error']}")
        return ok

    lo, hi = 0, None
    b = start
    while b <= limit:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return lo, probes  # fits up to the limit
    while hi - lo > max(2, lo // 16):
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, probes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="qlip-tiny,qlip-b-16-256")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    ap.add_argument("--grad-checkpointing", choices=("off", "on", "both"), default="off",
                    help="model.grad_checkpointing of the steps (both: a row each)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak of the device for MFU (default: known GPUs' dense bf16 peak; none on CPU)")
    ap.add_argument("--batch-tiny", type=int, default=32)
    ap.add_argument("--batch-large", type=int, default=2, help="batch of the non-tiny presets (default 2)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (tiny: x4)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    ap.add_argument("--mem-cap-mb", type=float, default=256.0, help="memory cap of the max-batch search (MB)")
    ap.add_argument("--chunk", type=int, default=32, help="gradient-caching chunk of the max-batch search")
    ap.add_argument("--max-batch-limit", type=int, default=16384)
    ap.add_argument("--no-max-batch", action="store_true")
    ap.add_argument("--json", help="also write all results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0

    import torch
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = a.threads or os.cpu_count() or 1
    log = lambda s: print(s, flush=True)  # noqa: E731
    t_start = time.time()
    results = {"device": device, "threads": threads, "throughput": [], "max_batch": {}}
    log(f"device {device}, {threads} threads; stage-1 step = MSE + BSQ + InfoNCE, LAMB, grad clip")
    log(f"{'preset':<15} {'precision':<9} {'ckpt':>4} {'batch':>5} {'step s':>8} {'img/s':>8} {'MFU':>6} "
        f"{'step MB':>9} {'peak MB':>9}")
    precisions = a.precisions.split(",")
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.grad_checkpointing]
    for preset in a.presets.split(","):
        tiny = preset == "qlip-tiny"
        row = {}
        for precision in precisions:
            for ckpt in ckpts:
                spec = {"preset": preset, "precision": precision, "batch": a.batch_tiny if tiny else a.batch_large,
                        "chunk": 0, "steps": a.steps * (4 if tiny else 1), "warmup": a.warmup, "threads": threads,
                        "device": device, "ckpt": ckpt}
                r = run_config(spec)
                results["throughput"].append(r)
                if not ckpt:
                    row[precision] = r
                if "error" in r:
                    log(f"{preset:<15} {precision:<9} {'on' if ckpt else 'off':>4} {spec['batch']:>5} "
                        f"failed: {r['error']}")
                    continue
                peak = peak_tflops(r["device_name"], a.peak_tflops)
                if peak:
                    r["mfu"] = r["train_flops_per_img"] * r["img_per_s"] / (peak * 1e12)
                mfu = f"{r['mfu'] * 100:5.1f}%" if "mfu" in r else f"{'-':>6}"
                log(f"{preset:<15} {precision:<9} {'on' if ckpt else 'off':>4} {r['batch']:>5} {r['step_s']:8.3f} "
                    f"{r['img_per_s']:8.1f} {mfu} {r['step_mem_mb']:9.0f} {r['peak_mb']:9.0f}")
        if all(p in row and "error" not in row[p] for p in ("fp32", "bf16")):
            ratio = row["fp32"]["step_s"] / row["bf16"]["step_s"]
            mem = row["bf16"]["step_mem_mb"] / max(row["fp32"]["step_mem_mb"], 1e-9)
            results.setdefault("ratios", {})[preset] = {"bf16_over_fp32_speed": ratio, "bf16_over_fp32_step_mem": mem}
            log(f"  -> {preset}: bf16/fp32 speed {ratio:.2f}x, step memory bf16/fp32 {mem:.2f}")

    if not a.no_max_batch:
        log(f"largest contrastive batch of qlip-tiny (fp32) with step memory <= {a.mem_cap_mb:.0f} MB:")
        base = {"preset": "qlip-tiny", "precision": "fp32", "steps": 0, "warmup": 1, "threads": threads,
                "device": device}
        plain, p1 = max_batch({**base, "chunk": 0}, a.mem_cap_mb, 64, a.max_batch_limit, log)
        cached, p2 = max_batch({**base, "chunk": a.chunk}, a.mem_cap_mb, 64, a.max_batch_limit, log)
        results["max_batch"] = {"cap_mb": a.mem_cap_mb, "chunk": a.chunk, "plain": plain, "cached": cached,
                                "probes_plain": p1, "probes_cached": p2,
                                "cached_over_plain": cached / plain if plain else None}
        log(f"  -> plain {plain}, gradient caching (chunk {a.chunk}) {cached}: "
            f"cached/plain {cached / plain if plain else float('nan'):.1f}x")
    results["total_s"] = time.time() - t_start
    log(f"total {results['total_s']:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
