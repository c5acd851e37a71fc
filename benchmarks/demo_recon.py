"""What limits the demo's reconstructions: stage-2 variants from one stage-1 model, judged on the
validation split (docs/demo.md, "Fourth round: reconstructions that keep the shape").

    # stage 2 of the demo recipe (the baseline of this comparison), from a finished `qlip demo`
    python benchmarks/demo_recon.py --stage1 runs/demo/qlip_stage1/final --out runs/rec/base

    # the same with the convolutional pixel head (decoder.head=conv): the stage-1 model's bottleneck
    # and decoder transformer are kept, the new head starts from its init
    python benchmarks/demo_recon.py --stage1 runs/demo/qlip_stage1/final --out runs/rec/conv --head conv

    # any stage-2 recipe override, e.g. no embedding-consistency term, or more steps
    python benchmarks/demo_recon.py --stage1 ... --out runs/rec/s0 loss.alpha_s=0 optim.steps=2200

    # a stage-1 recipe trained from scratch (no --stage1) with overrides, e.g. the reconstruction
    # weight; the demo's own stage-1 model judged alone (--judge-only) is its baseline
    python benchmarks/demo_recon.py --data runs/demo/data --recipe qlip/configs/demo-stage1.yaml \
        --out runs/s1w/r4 loss.alpha_r=4
    python benchmarks/demo_recon.py --stage1 runs/demo/qlip_stage1/final --out runs/s1w/base --judge-only

Each run prints one JSON line (and writes OUT/result.json): the validation split's PSNR, SSIM, the
independent shape judge's colour and kind accuracy on the reconstructions (fractions; the judge
reads the pixels only, qlip.eval.shape_judge), the zero-shot top-1 and kind accuracy on the
originals, distinct codes, the training time, and the same for
every checkpoint with ``--checkpoints``. The test split is not read, except by ``--judge-only
--split test``: recipes are chosen on validation (docs/evaluation.md), and a model so chosen is
judged on the held-out test images once.

    python benchmarks/demo_recon.py --stage1 runs/rec11/long20k/run/final --data runs/demo/data \
        --out runs/rec11/long20k-test --judge-only --split test
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

# keep benchmarks/ off sys.path (its scripts are not modules of this program)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_head(stage1: str, out: str, head: str, channels: int) -> str:
    """A copy of the stage-1 model whose decoder has a fresh ``head`` (what ``model.decoder_head``
    does inside a recipe; kept as a separate folder so that the run's init is inspectable)."""
    from qlip.io import load
    load(stage1).with_decoder_head(head, channels).save_pretrained(out)
    print(f"[demo_recon] {out}: decoder.head={head}, head_channels={channels}")
    return out


def judge(model_dir: str, data: str, limit: int = 0) -> dict:
    from qlip.demo.qlip import evaluate
    from qlip.io import load
    ev = evaluate(load(model_dir), data, judge=True, keep=1, limit=limit or None)
    return {"psnr": round(ev["psnr"], 3), "ssim": round(ev["ssim"], 4),
            "judge_colour": round(ev["judge_colour_acc"], 4), "judge_kind": round(ev["judge_kind_acc"], 4),
            "distinct_codes": ev["codes"]["distinct_codes"], "n": ev["n_images"],
            "zero_shot_top1": ev.get("zero_shot_top1"), "kind_acc": ev.get("kind_acc")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage1", default=None,
                    help="the stage-1 model (runs/demo/qlip_stage1/final); none: --recipe trains from scratch")
    ap.add_argument("--judge-only", action="store_true", help="judge --stage1 as it is (no training)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="demo data folder (default: two levels above --stage1 + /data)")
    ap.add_argument("--recipe", default=os.path.join(REPO, "qlip/configs/demo-stage2.yaml"))
    ap.add_argument("--head", choices=["linear", "conv"], default=None, help="swap the decoder's pixel head")
    ap.add_argument("--head-channels", type=int, default=16)
    ap.add_argument("--checkpoints", action="store_true", help="also judge every checkpoint")
    ap.add_argument("--split", choices=["val", "test"], default="val",
                    help="the images judged; test only with --judge-only, once, for a model chosen on validation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="stage-2 recipe overrides, e.g. loss.alpha_s=0")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.stage1 is None and (a.data is None or a.head or a.judge_only):
        raise SystemExit("without --stage1 (a stage-1 recipe from scratch) give --data, and no --head / --judge-only")
    if a.split == "test" and not a.judge_only:
        raise SystemExit("--split test judges a model chosen on validation: use it with --judge-only")
    data = a.data or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(a.stage1))), "data")
    val = os.path.join(data, "shapes-val-*.tar" if a.split == "val" else "shapes-heldout-*.tar")
    if not glob.glob(val):
        raise SystemExit(f"no {'validation' if a.split == 'val' else 'test'} shards {val}: run `qlip demo` first")
    os.makedirs(a.out, exist_ok=True)
    if a.judge_only:
        return _report(a.out, {"model": a.stage1, "split": a.split, "final": judge(a.stage1, val)})
    init = a.stage1 if a.head is None else with_head(a.stage1, os.path.join(a.out, "init"), a.head, a.head_channels)
    cmd = [sys.executable, "-m", "qlip", "train", a.recipe, "--out", os.path.join(a.out, "run"),
           *([f"model.init={init}"] if init else []), f"data.train={os.path.join(data, 'shapes-train-*.tar')}",
           *a.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env)
    result = {"overrides": a.overrides, "head": a.head or ("stage-1's" if init else "the recipe's"), "train_s": round(time.time() - t0, 1),
              "final": judge(os.path.join(a.out, "run", "final"), val)}
    if a.checkpoints:
        for ck in sorted(glob.glob(os.path.join(a.out, "run", "checkpoints", "*")), key=os.path.getmtime):
            model_dir = ck if os.path.exists(os.path.join(ck, "config.json")) else os.path.join(ck, "model")
            if os.path.exists(os.path.join(model_dir, "config.json")):
                result[os.path.basename(ck)] = judge(model_dir, val)
    return _report(a.out, result)


def _report(out: str, result: dict) -> int:
    """OUT/result.json and the JSON line."""
    with open(os.path.join(out, "result.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
