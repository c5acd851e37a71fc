"""Speed of the FID Inception-v3 on a CPU: one NCHW batch (the way rFID ran until stop 36) against
``InceptionFeatures``' CPU path (chunks of ``cpu_chunk`` images in channels-last layout), in one run.

    python benchmarks/fid_speed.py [--images 128] [--threads 1 2] [--rounds 2]

The demo's rFID runs Inception on 3 x 128 images (docs/demo.md); this is most of its evaluation time.
For each thread count: seconds per ``--images`` 64x64 random images for both paths (the best of
``--rounds`` alternating rounds, after one warm-up round each), their ratio, and the largest
difference of the 2048 features (the two paths compute the same function; only the order of the
float operations differs). Prints one JSON object per thread count, with the CPU model.
"""
from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args(argv)

    import torch
    from qlip.eval.recon import TF_INPUT_RANGE, inception_extractor
    from qlip.nn.precision import cpu_has_amx_bf16, cpu_name
    f = inception_extractor()
    lo, hi = TF_INPUT_RANGE
    x = torch.rand(a.images, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    @torch.no_grad()
    def one_batch(x01):  # the pre-stop-36 forward: the whole batch at once, NCHW
        u = torch.round(x01.clamp(0, 1) * 255.0)
        u = torch.nn.functional.interpolate(u, size=(299, 299), mode="bilinear", align_corners=False)
        return f.net((u / 255.0 * (hi - lo) + lo).clamp(lo, hi)).reshape(len(x01), -1)

    paths = {"one_nchw_batch": one_batch, "chunks_channels_last": f}
    for threads in a.threads:
        torch.set_num_threads(threads)
        best, feats = {}, {}
        for name, fn in paths.items():
            feats[name] = fn(x)  # warm-up
        for _ in range(a.rounds):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(x)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        diff = float((feats["one_nchw_batch"] - feats["chunks_channels_last"]).abs().max())
        print(json.dumps({"cpu": cpu_name() or "unknown", "amx_bf16": cpu_has_amx_bf16(), "torch": torch.__version__, "threads": threads, "images": a.images,
                          "chunk": f.cpu_chunk, **{f"{k}_s": round(v, 2) for k, v in best.items()},
                          "speedup": round(best["one_nchw_batch"] / best["chunks_channels_last"], 2),
                          "max_feature_diff": diff,
                          "load_average": [round(v, 2) for v in os.getloadavg()]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
