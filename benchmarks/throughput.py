#!/usr/bin/env python
"""Whole-dataset tokenization throughput: end to end (image files -> ids) against the model alone.

    python benchmarks/throughput.py                                   # qlip-b-16-256, 2 cores: ~5 min
    python benchmarks/throughput.py --preset qlip-tiny --images 8 --batch-size 4 --rounds 1   # smoke
    python benchmarks/throughput.py --device cuda --precisions fp32 bf16 --batch-size 64 --workers 12

For every precision it times, interleaved over ``--rounds`` rounds (after one warm-up round):

* ``model``      ``model.tokenize`` over pre-decoded batches already in memory (the ceiling);
* ``e2e wN``     what ``qlip tokenize FOLDER`` does: ``qlip.data.decode.image_batches`` (decode,
                 resize, crop and normalise in N DataLoader worker processes, the worker start-up
                 included) feeding ``model.tokenize``, ids copied back to the host; for N = 0 and
                 N = ``--workers``;
* ``decode``     the decoding alone in the main process (images/s of one core).

The inputs are ``--images`` synthetic JPEG photographs-like files (smooth gradients plus noise,
``--source-size`` pixels, quality 90) written to a temporary folder, so decoding and resizing cost
what real files cost. It checks that every end-to-end run gives exactly the model-only ids and
prints images/s (medians over rounds) and the ratio end-to-end / model (median of per-round ratios).
``precision`` is that of ``qlip.load(..., precision=...)``; random-init weights.
"""
from __future__ import annotations

import os
import sys

# keep benchmarks/ off sys.path (its scripts are not modules of this program)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import qlip  # noqa: E402
from qlip.data.decode import image_batches  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qlip-b-16-256")
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16", "auto"])
    p.add_argument("--images", type=int, default=32, help="number of image files (default 32)")
    p.add_argument("--source-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"),
                   help="pixel size of the JPEG files (default 500 375, ImageNet-like)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2, help="decoding processes of the end-to-end run")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds after one warm-up round")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads of the main process")
    p.add_argument("--json", metavar="OUT")
    return p.parse_args(argv)


def write_images(folder: str, n: int, size, seed: int = 0) -> list:
    from PIL import Image
    rs = np.random.RandomState(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(n):
        c = rs.uniform(0, 1, (3, 3))
        img = np.stack([c[k, 0] * xx / w + c[k, 1] * yy / h + c[k, 2] * np.sin((xx + yy) / (7 + 5 * k))
                        for k in range(3)], -1)
        img = np.clip(img / max(img.max(), 1e-6) * 220 + rs.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:05d}.jpg")
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_model(model, batches):
    out = []
    with torch.inference_mode():
        for x in batches:
            out.append(model.tokenize(x.to(model.device, non_blocking=True)).cpu())
    return torch.cat(out)


def run_e2e(model, paths, batch_size, workers):
    out = []
    with torch.inference_mode():
        for x in image_batches(paths, model.config.preprocess, batch_size, workers=workers,
                               pin_memory=model.device.type == "cuda"):
            out.append(model.tokenize(x.to(model.device, non_blocking=True)).cpu())
    return torch.cat(out)


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t_start = time.perf_counter()
    results = {"preset": a.preset, "device": str(device), "images": a.images, "batch_size": a.batch_size,
               "workers": a.workers, "threads": torch.get_num_threads(), "rows": []}
    worker_counts = sorted({0, a.workers})
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(tmp, a.images, a.source_size)
        for precision in a.precisions:
            torch.manual_seed(0)
            model = qlip.load(a.preset, pretrained=False, device=device, precision=precision).eval()
            model.drop_text()
            t_dec, batches = timed(lambda: list(image_batches(paths, model.config.preprocess, a.batch_size)), device)
            modes = ["model"] + [f"e2e w{w}" for w in worker_counts]
            fns = {"model": lambda: run_model(model, batches)}
            for w in worker_counts:
                fns[f"e2e w{w}"] = lambda w=w: run_e2e(model, paths, a.batch_size, w)
            times = {m: [] for m in modes}
            ratios = {m: [] for m in modes[1:]}
            ref = None
            for r in range(a.rounds + 1):
                this = {}
                for m in modes:
                    t, ids = timed(fns[m], device)
                    if ref is None:
                        ref = ids
                    elif not torch.equal(ids, ref):
                        raise SystemExit(f"{m}: ids differ from the model-only ids")
                    this[m] = t
                if r == 0:
                    continue  # warm-up
                for m in modes:
                    times[m].append(this[m])
                for m in modes[1:]:
                    ratios[m].append(this["model"] / this[m])
            row = {"precision": model.precision_choice.name, "asked": precision,
                   "decode_img_per_s": a.images / t_dec}
            for m in modes:
                row[m] = {"img_per_s": a.images / statistics.median(times[m]), "seconds": times[m]}
                if m != "model":
                    row[m]["of_model"] = statistics.median(ratios[m])
            results["rows"].append(row)

    print(f"{a.preset} (random weights), {device}, {torch.get_num_threads()} threads, {a.images} JPEGs "
          f"{a.source_size[0]}x{a.source_size[1]}, batch {a.batch_size}, {a.rounds} rounds (+1 warm-up); "
          "ids identical in every mode")
    head = f"{'precision':<10}{'decode img/s':>13}{'model img/s':>12}" + "".join(
        f"{f'e2e w{w} img/s':>15}{'/model':>8}" for w in worker_counts)
    print(head)
    print("-" * len(head))
    for row in results["rows"]:
        line = f"{row['precision']:<10}{row['decode_img_per_s']:>13.1f}{row['model']['img_per_s']:>12.2f}"
        for w in worker_counts:
            e = row[f"e2e w{w}"]
            line += f"{e['img_per_s']:>15.2f}{e['of_model'] * 100:>7.1f}%"
        print(line)
    results["wall_s"] = time.perf_counter() - t_start
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; wall time {results['wall_s']:.0f} s")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
