"""The training loader with and without ``data.cache_mb`` (decoded images and raw shard samples kept
in memory after the first epoch, the CLIP tokenizer's caption memo), in one run, on one thread.

    python benchmarks/loader_cache.py --data runs/demo/data [--batches 1000] [--batch-size 64] [--cache-mb 640]

The demo's stage 1 reads 1,000 batches of 64 from 10,240 images (6.25 epochs) on one core per lane;
this measures the loader alone (the demo's transform and tokenizer, its shuffle buffer, infinite mode):
seconds for ``--batches`` batches without the cache (and without the memo, as before stop 37) and with
them, their ratio, and whether every batch is the same (keys, images, token ids). Prints one JSON object
with the CPU model.
"""
from __future__ import annotations

import os
import sys

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/data", help="a shapes folder (qlip demo's data)")
    ap.add_argument("--batches", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--cache-mb", type=int, default=640)
    a = ap.parse_args(argv)

    import torch
    from qlip.data.pipeline import image_transform, webdataset_loader
    from qlip.model.config import OPENAI_MEAN, OPENAI_STD
    from qlip.nn.precision import cpu_has_amx_bf16, cpu_name
    from qlip.text import Tokenizer
    torch.set_num_threads(1)
    shards = os.path.join(a.data, "shapes-train-*.tar")
    tf = image_transform(64, OPENAI_MEAN, OPENAI_STD)  # the demo preset's normalisation
    out = {"cpu": cpu_name(), "amx_bf16": cpu_has_amx_bf16(), "threads": 1, "batches": a.batches,
           "batch_size": a.batch_size}
    digests = {}
    for name, cache in (("plain", 0), ("cached", a.cache_mb)):
        tok = Tokenizer(32)
        if not cache:
            tok.MEMO_SIZE = 0  # no caption memo either: the loader as it was
        loader = webdataset_loader(shards, tf, tok, a.batch_size, seed=0, shuffle_buffer=2000, infinite=True,
                                   cache_mb=cache)
        h, it = hashlib.sha256(), iter(loader)
        t0 = time.perf_counter()
        for _ in range(a.batches):
            b = next(it)
            h.update(b["images"].numpy().tobytes())
            h.update(b["tokens"].numpy().tobytes())
            h.update("\n".join(b["keys"]).encode())
        out[f"{name}_s"] = round(time.perf_counter() - t0, 2)  # hashing included in both
        digests[name] = h.hexdigest()
    out["speedup"] = round(out["plain_s"] / out["cached_s"], 2)
    out["same_batches"] = digests["plain"] == digests["cached"]
    print(json.dumps(out))
    return 0 if out["same_batches"] else 1


if __name__ == "__main__":
    sys.exit(main())
