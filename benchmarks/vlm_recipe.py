"""Compare VLM training recipes on the demo QLIP's ``layer_-2`` (issue 16: colour and kind).

One variant (vision features at layer -2 of ``--qlip``), LLaVA's two stages through the
training engine as ``qlip demo vlm`` runs them, the demo's held-out evaluation, one JSON line
per run appended to ``--log`` (settings -> colour / kind / position / size, seconds)::

    OMP_NUM_THREADS=1 python benchmarks/vlm_recipe.py --out /tmp/vlm-bench --tag base \\
        --feature-norm none --tokenizer-texts answers --max-length 128
    OMP_NUM_THREADS=1 python benchmarks/vlm_recipe.py --out /tmp/vlm-bench --tag std \\
        --feature-norm standardize

The data and the tiny LLM are written once per (images, tokenizer texts) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    from qlip.demo import vlm as demo
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qlip", default="runs/demo/qlip")
    p.add_argument("--out", required=True)
    p.add_argument("--tag", required=True, help="this run's name (folder and log entry)")
    p.add_argument("--log", default=None, help="JSON lines log (default OUT/log.jsonl)")
    p.add_argument("--layer", type=int, default=-2)
    p.add_argument("--features", default="hidden")
    p.add_argument("--feature-norm", default=demo.RECIPE["feature_norm"])
    p.add_argument("--multi-turn", type=int, default=int(demo.RECIPE["multi_turn"]), choices=[0, 1],
                   help="1: all of an image's questions in one conversation; 0: one question per record")
    p.add_argument("--tokenizer-texts", default=demo.RECIPE["tokenizer_texts"], choices=["answers", "rendered"])
    p.add_argument("--vocab-size", type=int, default=demo.RECIPE["vocab_size"])
    p.add_argument("--max-length", type=int, default=demo.RECIPE["max_length"])
    p.add_argument("--train-images", type=int, default=demo.FULL["train_images"])
    p.add_argument("--heldout-images", type=int, default=demo.FULL["heldout_images"])
    p.add_argument("--stage1-steps", type=int, default=demo.FULL["stage1_steps"])
    p.add_argument("--stage2-steps", type=int, default=demo.FULL["stage2_steps"])
    p.add_argument("--batch-size", type=int, default=demo.FULL["batch_size"])
    p.add_argument("--stage1-lr", type=float, default=demo.RECIPE["stage1_lr"])
    p.add_argument("--stage2-lr", type=float, default=demo.RECIPE["stage2_lr"])
    p.add_argument("--projector-lr", type=float, default=demo.RECIPE["stage2_projector_lr"],
                   help="stage 2's projector lr (default: stage 2's lr)")
    p.add_argument("--eval-split", default="val", choices=["val", "heldout"],
                   help="where the answers are scored: the validation split (default; recipes are chosen "
                        "there) or the held-out test split the demo reports")
    p.add_argument("--eval-images", type=int, default=200, help="images of --eval-split scored (default 200)")
    p.add_argument("--llm-hidden", type=int, default=demo.RECIPE["llm_hidden"], help="the tiny LLM's width")
    p.add_argument("--llm-layers", type=int, default=demo.RECIPE["llm_layers"], help="the tiny LLM's depth")
    p.add_argument("--token-merge", type=int, default=demo.RECIPE["token_merge"],
                   help="k x k patch tokens per LLM position (1: LLaVA-1.5)")
    p.add_argument("--multi-shape-fraction", type=float, default=demo.RECIPE["multi_shape_fraction"],
                   help="at most this share of multi-shape (count-only) training images (default: the recipe's)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import qlip.vlm  # noqa: F401  (registers task "vlm")

    cfg = {"train_images": a.train_images, "heldout_images": a.heldout_images, "stage1_steps": a.stage1_steps,
           "stage2_steps": a.stage2_steps, "batch_size": a.batch_size}
    recipe = {"feature_norm": a.feature_norm, "multi_turn": bool(a.multi_turn), "tokenizer_texts": a.tokenizer_texts,
              "vocab_size": a.vocab_size,
              "max_length": a.max_length, "llm_hidden": a.llm_hidden, "llm_layers": a.llm_layers,
              "token_merge": a.token_merge, "multi_shape_fraction": a.multi_shape_fraction, "stage1_lr": a.stage1_lr, "stage2_lr": a.stage2_lr, "stage2_projector_lr": a.projector_lr}
    shared = os.path.join(a.out, f"shared-{a.train_images}-{a.heldout_images}-{a.multi_turn}-"
                                 f"{a.tokenizer_texts}-{a.vocab_size}-{a.llm_hidden}x{a.llm_layers}"
                                 + ("" if a.multi_shape_fraction is None else f"-multi{a.multi_shape_fraction:g}"))
    job = demo.prepare(shared, cfg, recipe, 64)
    if a.eval_split != "heldout" or a.eval_images != a.heldout_images:
        from qlip.data.shapes_qa import write_shapes_qa
        job["heldout_json"] = write_shapes_qa(job["data"], a.eval_images, split=a.eval_split, size=64,
                                              types=list(demo.TYPES))
    job["out"] = os.path.join(a.out, a.tag)
    t0 = time.time()
    res = demo._variant("layer_-2" if a.features == "hidden" else a.features, a.qlip, a.layer, a.features, job)
    entry = {"tag": a.tag, **cfg, **recipe, "eval_split": a.eval_split, "eval_images": a.eval_images, "layer": a.layer, "features": a.features, **res["metrics"],
             "loss": res["loss"], "seconds": res["seconds"], "wall_s": round(time.time() - t0, 1)}
    log = a.log or os.path.join(a.out, "log.jsonl")
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps(entry))


if __name__ == "__main__":
    main()
