"""Compare UM3 training recipes on the demo's data (issue 12: captioning and drawing).

One run of ``qlip demo um3`` (default ``um3``: Eq. 6 split softmax + Eq. 7 calm-down), trained
through the same engine task and data, then the demo's figures (text perplexity, caption colour /
kind, drawings judged by the shape judge) on the **validation** split's images by default, so
that a recipe is chosen without looking at the test split the demo reports. One JSON line per run
is appended to ``--log`` (settings -> figures, seconds)::

    OMP_NUM_THREADS=1 python benchmarks/um3_recipe.py --demo-dir runs/demo --out /tmp/um3-bench \\
        --tag base
    OMP_NUM_THREADS=1 python benchmarks/um3_recipe.py --demo-dir runs/demo --out /tmp/um3-bench \\
        --tag steps600 --steps 600
    OMP_NUM_THREADS=1 python benchmarks/um3_recipe.py --demo-dir runs/demo --out /tmp/um3-bench \\
        --tag steps600 --steps 600 --reuse --cfg-scale 7     # the same model, drawn at CFG 7

The data (corpus, tiny Llama, token shards, the tokenized evaluation images) is written once per
(model size, evaluation split, corpus size) under ``--out`` (``prepared.json`` marks it done; runs
started at the same time wait for the first one's and reuse it). The screens in docs/um3.md before the
demo's corpus grew to 40,000 sentences ran with ``--corpus-sentences 8000`` (then the default).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import time

import torch


INT_KEYS = ("i2t_from", "steps", "batch_size", "dim", "layers", "heads", "kv_heads", "ffn", "warmup", "calm_down_steps",
            "test_images", "draws_per_class", "train_shards", "groups", "corpus_sentences")
OTHER_KEYS = ("seed", "draw_seed", "lr", "visual_init", "visual_bits", "precision", "cfg_scale", "loss_average",
              "r0", "rT", "i2t_share", "i2t_image_loss", "top_k", "temperature", "caption_cfg", "layout")


def main() -> None:
    from qlip.demo import um3 as demo
    full = demo.FULL
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo-dir", default="runs/demo", help="a `qlip demo` output (its QLIP and shapes data)")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", required=True, help="this run's name (folder and log entry)")
    p.add_argument("--log", default=None, help="JSON lines log (default OUT/log.jsonl)")
    p.add_argument("--run", default="um3", choices=sorted(demo.RUNS), help="which of the demo's runs")
    p.add_argument("--eval-split", default="val", choices=["val", "heldout"])
    for key in INT_KEYS:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=full[key])
    p.add_argument("--lr", type=float, default=full["lr"])
    p.add_argument("--visual-init", default=full["visual_init"], choices=["mean", "bits"])
    p.add_argument("--visual-bits", action=argparse.BooleanOptionalAction, default=full["visual_bits"],
                   help="learned per-bit vectors on the visual rows (model.visual_bits)")
    p.add_argument("--layout", default=full["layout"], choices=["subtoken", "token"],
                   help="model.layout: a sequence position per sub-token (paper) or per QLIP token (ours)")
    p.add_argument("--loss-average", default=full["loss_average"], choices=["tokens", "rows"],
                   help="loss.average: the mean over target tokens or over rows (each row's token mean)")
    p.add_argument("--r0", type=float, default=full["r0"], help="Eq. 7: text-only fraction at step 0")
    p.add_argument("--rT", type=float, default=full["rT"], help="Eq. 7: text-only fraction after calm-down")
    p.add_argument("--i2t-share", type=float, default=full["i2t_share"],
                   help="image-to-text share of the multimodal rows")
    p.add_argument("--i2t-image-loss", action=argparse.BooleanOptionalAction, default=full["i2t_image_loss"],
                   help="data.i2t_image_loss: image-to-text rows also score their image (an unconditional drawing)")
    p.add_argument("--cfg-scale", type=float, default=full["cfg_scale"], help="drawing guidance scale")
    p.add_argument("--top-k", type=int, default=full["top_k"],
                   help="drawing: top-k over each sub-token's rows (>= 2^(bits/groups): no cut)")
    p.add_argument("--temperature", type=float, default=full["temperature"], help="drawing: sampling temperature")
    p.add_argument("--caption-cfg", type=float, default=full["caption_cfg"],
                   help="captions: guidance against the text-only model (1: none)")
    p.add_argument("--seed", type=int, default=0, help="training seed (model init and batches; the demo's is 0)")
    p.add_argument("--draw-seed", type=int, default=1,
                   help="sampling seed of the drawings (the demo reports seed 0: recipes are chosen on others)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse this tag's finished training (same settings) and evaluate it again, e.g. at "
                        "another --cfg-scale")
    p.add_argument("--precision", default=full["precision"], choices=["fp32", "bf16", "auto"],
                   help="train.precision (auto: bf16 on a GPU or a CPU with AMX)")
    a = p.parse_args()
    torch.set_num_threads(1)
    cfg = dict(full)
    for key in INT_KEYS + OTHER_KEYS:
        cfg[key] = getattr(a, key)
    cfg["ckpt_every"] = max(cfg["steps"] // 4, 1)
    qlip_dir, data = demo._demo_inputs(a.demo_dir)
    shared = os.path.join(a.out, f"shared-{cfg['dim']}x{cfg['layers']}-h{cfg['heads']}-{cfg['kv_heads']}-{cfg['ffn']}-"
                                 f"{cfg['train_shards']}-{a.eval_split}{cfg['test_images']}-c{cfg['corpus_sentences']}")
    t0 = time.time()
    os.makedirs(a.out, exist_ok=True)
    done = os.path.join(shared, "prepared.json")
    with open(shared + ".lock", "w") as lock:  # runs started together: one prepares, the others wait and reuse
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(done):  # never rewritten while another run may be training from it
            with open(done, encoding="utf-8") as f:
                prep = json.load(f)
        else:
            prep = demo._prepare(qlip_dir, data, shared, cfg, False, True, eval_split=a.eval_split)
            with open(done, "w", encoding="utf-8") as f:
                json.dump(prep, f)
    res = demo._lane([a.run], prep, qlip_dir, os.path.join(a.out, a.tag), cfg, False, a.reuse,
                     reuse_eval=False)[a.run]
    keys = INT_KEYS + OTHER_KEYS  # the settings, logged with the figures
    entry = {"tag": a.tag, "run": a.run, "eval_split": a.eval_split, "eval_images": cfg["test_images"],
             **{k: cfg[k] for k in keys}, "train_pairs": prep["train_pairs"], **res["figures"],
             "ceiling": prep["ceiling"], "train_s": res.get("train_s"), "wall_s": round(time.time() - t0, 1)}
    log = a.log or os.path.join(a.out, "log.jsonl")
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps(entry))


if __name__ == "__main__":
    main()
