"""``qlip demo``: the README's main job, a tiny end-to-end QLIP run on generated shapes.

1. generate the captioned-shapes shards (if missing): 64x64 images, 1-3 shapes, captions;
2. stage 1 (QLIP: MSE + BSQ + contrastive, AdamW, frozen random text tower), stage 2 (encoder
   frozen, text dropped: MSE + BSQ, AdamW);
3. the paper's Figure 1 / Table 3a in miniature: a CLIP-only and a reconstruction-only model
   of the same size and budget;
4. evaluation on the labelled validation split (320 images, for choosing the recipe) and the
   held-out test split (640 images, reported once; 32 classes "a photo of a {colour} {kind}"):
   zero-shot top-1 on the originals and on the (clamped) reconstructions, colour and kind
   accuracy, PSNR, SSIM, rFID (real FID Inception-v3, first 128 test images) after stage 1 and
   after stage 2, what an independent non-learned judge (``qlip.eval.shape_judge``) sees in the
   reconstructions, LPIPS with an explicitly random AlexNet trunk (secondary), code usage;
5. ``OUT/report.html`` + ``OUT/metrics.json`` (table, loss curves, reconstruction grid) and the
   final model in ``OUT/qlip/`` (stage-2 bottleneck + decoder with the stage-1 encoder and text
   tower), loadable with ``qlip.load``.

Every stage checkpoints; ``--resume`` skips finished runs and resumes interrupted ones.

It drives training (``qlip.train``) and evaluation (``qlip.eval``), so it lives above both, in
``qlip.demo`` (the place of the downstream demos to come: ``qlip demo t2i|vlm|um3``).
"""
from __future__ import annotations

import json
import logging
import os
import time
import warnings
from importlib import resources
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..errors import DataError, QLIPError
from ..losses.reconstruction import RECONSTRUCTION_KINDS

log = logging.getLogger("qlip.demo")

DATA_N, DATA_HELDOUT, DATA_VAL, IMAGE_SIZE, SHARD = 10240, 640, 320, 64, 512
FAST_N, FAST_HELDOUT, FAST_VAL = 320, 64, 32  # --fast: one or two images per class (a smoke run)
# LPIPS is a secondary figure here, with an explicitly random AlexNet trunk (the torchvision
# weights are not available offline): it only compares the demo's runs with each other. The
# check "stage 2 improves the decoder" uses rFID with the real FID Inception (paper Table 3c).
LPIPS_NET = "alex-random"
RFID_N, FAST_RFID_N = 128, 8  # test images whose rFID is computed (Inception-v3 at 299 px is the cost)
ALT_N, FAST_ALT_N = 320, 32     # second-renderer images (qlip.eval.shapes_alt): renderer robustness
RUN_MARKER = "demo-run.json"  # {"fast": bool, "recipe": str}: what kind of run a --out folder holds
# the logged losses the report plots (and the console prints, with the quantizer and GAN terms): the
# contrastive term, the pixel term under its kind (loss.recon_kind) and LPIPS
PLOTTED_LOSSES = ("contrastive", *RECONSTRUCTION_KINDS, "lpips")

# ``--recipe paper``: the paper's recipe at the demo's scale (same data, sizes, steps, batches and
# evaluation), to put the demo's deviations in numbers (README, docs/demo.md "The paper's recipe at
# the demo's scale"). Stage 1: the preset's patchify stem and 4 encoder blocks, the text tower
# trained, LAMB (paper Table 8; one lr for all groups, 3e-3: the paper's per-group lrs are tuned
# for a 65,536 batch and a pre-trained text tower). Stage 2: MSE + BSQ + the 0.1-weighted GAN term
# (hinge, joining for the last 100 steps as the demo recipe's warm-up sets), no embedding
# consistency (ours). The paper's 0.1 LPIPS needs VGG weights that are not available offline, so
# it stays off here too (docs/evaluation.md). The baselines are derived from this stage 1.
# "recon_only": the reconstruction-only baseline's own overrides (issue 15: the baseline gets its own
# tuned recipe, chosen on validation). With the demo's stage-1 recipe it collapses (134 distinct codes
# on the validation images, judge colour 56%); four times the codebook-entropy weight gives 430 codes,
# 20.35 vs 19.14 dB and colour 77% vs 56% (a higher encoder lr, 1e-3, was worse; docs/demo.md "Tenth
# round"); without the per-sample entropy term as well (gamma_0 = 0, which pulls every token to a corner
# of the cube before the code has spread) 21.56 / 25.42 dB and colour 83% / 98% over seeds 0 / 1,
# against 20.35 / 18.72 dB and 77% / 70% with it (gamma_1 = 16 was worse; "Twelfth round").
RECIPES: Dict[str, Dict[str, List[str]]] = {
    # the reconstruction-only baseline's own setting, chosen on validation (docs/demo.md, rounds 10,
    # 12, 15): four times the codebook-entropy weight, no per-sample entropy term, and without the
    # bit decorrelation of QLIP's stage 1 (with it: 25.37 vs 26.00 dB)
    "demo": {"stage1": [], "stage2": [], "recon_only": ["model.overrides.quantizer.gamma_1=4",
                                                      "model.overrides.quantizer.gamma_0=0",
                                                      "loss.bit_decorrelation=0"]},
    "paper": {
        "stage1": ["loss.bit_decorrelation=0",  # ours, not the paper's
                   "model.overrides.vision.stem=patch", "model.overrides.vision.depth=4", "optim.optimizer=lamb",
                   "optim.lr=3e-3", "optim.lr_visual=3e-3", "optim.lr_text=3e-3", "optim.lr_generator=3e-3"],
        "stage2": ["loss.alpha_s=0", "loss.alpha_g=0.1"],
        "recon_only": [],
    },
}


def _recipe(name: str, overrides: List[str]):
    from ..train.recipe import load_recipe
    path = resources.files("qlip") / "configs" / name
    with resources.as_file(path) as p:
        return load_recipe(str(p), overrides)


def _run(name: str, recipe, out_dir: str, resume: bool, upstream_new: bool = False) -> Dict[str, Any]:
    """Train (or under ``resume`` reuse / continue) the run ``out_dir/name``; its summary, with
    ``reused`` True when a finished run of the same recipe was taken as it is. ``upstream_new``: the
    run it starts from was trained in this call, so an earlier run here is stale."""
    from ..train.engine import train
    from .resume import can_resume, finished_run, stale_run
    run_dir = os.path.join(out_dir, name)
    # the data and the stage-1 model live in the demo's folder (paths move with it): their identity is
    # the demo's own business (`_claim_out`, `upstream_new`), not a recipe change
    if stale_run(run_dir, recipe, resume, f"[demo] {name}", upstream_new, ignore=("data.train", "model.init")):
        resume = False
    s = finished_run(run_dir, recipe.optim.steps, resume)
    if s is not None:
        print(f"[demo] {name}: finished earlier, reusing {s['final_model']}")
        return {**s, "reused": True}
    again = can_resume(run_dir, resume)
    print(f"[demo] {name}: {recipe.optim.steps} steps x batch {recipe.data.batch_size}"
          + (" (resuming)" if again else ""))
    t0 = time.time()
    s = {**train(recipe, run_dir, resume=again), "reused": False}
    print(f"[demo] {name}: done in {time.time() - t0:.0f} s, last losses "
          + ", ".join(f"{k}={v:.4g}" for k, v in s["last_log"].items()
                      if k in (*PLOTTED_LOSSES, "quant", "g_gan")))
    return s


@torch.no_grad()
def evaluate(model, data: str, lpips_module=None, batch_size: int = 128, keep: int = 8,
             limit: Optional[int] = None, fid=None, fid_reference=None, rfid_n: Optional[int] = None,
             judge: bool = False) -> Dict[str, Any]:
    """Zero-shot (originals and reconstructions), colour/kind accuracy, PSNR, SSIM, LPIPS, codes;
    with ``fid`` (a feature extractor) the rFID of the first ``rfid_n`` images (the originals'
    statistics ``fid_reference`` are reused when given and returned as ``_fid_reference``); with
    ``judge`` the independent shape judge's colour / kind accuracy on the reconstructions.

    Accuracies are fractions. Zero-shot on reconstructions classifies what a user gets: the
    reconstruction clamped to [0, 1] and normalised again, not the raw decoder output.
    """
    from ..data.evalsets import open_dataset
    from ..data.shapes import KINDS, SHAPE_CLASSNAMES
    from ..eval.codes import CodeStats
    from ..eval.recon import FeatureStats, frechet_distance, psnr_per_image, ssim_per_image
    from ..eval.shape_judge import judge_accuracy
    from ..eval.zeroshot import zero_shot_classifier
    from ..model.preprocess import denormalize, normalize
    model.eval()
    ds = open_dataset(data)
    if fid is not None and fid_reference is None:
        fid_reference = fid_reference_stats(model, data, fid, rfid_n, batch_size)
    has_text = model.text is not None
    clf = zero_shot_classifier(model, list(SHAPE_CLASSNAMES), ["a photo of a {}"]) if has_text else None
    k = len(KINDS)
    acc = {"top1": 0, "recon_top1": 0, "colour": 0, "kind": 0}
    psnr, ssim, lp, n = [], [], [], 0
    codes = CodeStats(model.num_bits, model.config.quantizer.group_size)
    fake, n_fid = FeatureStats(), 0
    judged = {"colour": 0.0, "kind": 0.0}
    originals, recons = [], []
    for x, y in ds.batches(model.preprocess, batch_size, limit):
        p = model.image_pass(x, embed=True, quant_loss=False)  # one pass: embedding, ids, reconstruction
        codes.update(p.ids)
        a = denormalize(p.recon, model.image_mean, model.image_std).clamp(0, 1)
        b = denormalize(x, model.image_mean, model.image_std).clamp(0, 1)
        psnr.append(psnr_per_image(a, b))
        ssim.append(ssim_per_image(a, b))
        if lpips_module is not None:
            lp.append(lpips_module(a * 2 - 1, b * 2 - 1))
        if has_text:
            pred = (p.image_embeds.float() @ clf).argmax(-1)
            seen = normalize(a, model.image_mean, model.image_std)  # the clamped images a user gets
            pred_r = (model.encode_image(seen, normalize=True).float() @ clf).argmax(-1)
            acc["top1"] += int((pred == y).sum())
            acc["recon_top1"] += int((pred_r == y).sum())
            acc["colour"] += int((pred // k == y // k).sum())
            acc["kind"] += int((pred % k == y % k).sum())
        if fid is not None and (rfid_n is None or n_fid < rfid_n):
            take = len(y) if rfid_n is None else min(len(y), rfid_n - n_fid)
            fake.update(fid(a[:take]))
            n_fid += take
        if judge:
            j = judge_accuracy(a, y)
            judged["colour"] += j["colour"] * len(y)
            judged["kind"] += j["kind"] * len(y)
        if len(originals) < keep:
            originals += list(b[: keep - len(originals)])
            recons += list(a[: keep - len(recons)])
        n += len(y)
    out: Dict[str, Any] = {"n_images": n, "psnr": float(torch.cat(psnr).mean()), "ssim": float(torch.cat(ssim).mean())}
    if lp:
        out["lpips"] = float(torch.cat(lp).mean())
    if has_text:
        out.update(zero_shot_top1=acc["top1"] / n, zero_shot_top1_recon=acc["recon_top1"] / n,
                   colour_acc=acc["colour"] / n, kind_acc=acc["kind"] / n)
    if fid is not None:
        out["rfid"] = frechet_distance(*fid_reference.compute(), *fake.compute())
        out["rfid_n"] = n_fid
        out["_fid_reference"] = fid_reference
    if judge:
        out["judge_colour_acc"], out["judge_kind_acc"] = judged["colour"] / n, judged["kind"] / n
    cs = codes.compute()
    out["codes"] = {k2: cs[k2] for k2 in ("distinct_codes", "code_usage", "code_entropy", "bit_entropy_mean")}
    out["_bit_p1"] = cs["bit_p1"]
    out["_images"] = (torch.stack(originals), torch.stack(recons))
    return out


@torch.no_grad()
def real_image_features(model, data: str, fid, n: Optional[int] = None, batch_size: int = 128):
    """``fid``'s features (rows, numpy) of the first ``n`` images of ``data`` as ``evaluate`` sees the
    originals: ``model.preprocess``, then back to [0, 1] (every demo model preprocesses alike)."""
    from ..data.evalsets import open_dataset
    from ..model.preprocess import denormalize
    feats = [fid(denormalize(x, model.image_mean, model.image_std).clamp(0, 1)).cpu().numpy()
             for x, _ in open_dataset(data).batches(model.preprocess, batch_size, n)]
    return np.concatenate(feats)[:n]


def fid_reference_stats(model, data: str, fid, n: Optional[int] = None, batch_size: int = 128):
    """The originals' Inception statistics (``FeatureStats``) that ``evaluate``'s rFID compares with:
    computed by the baselines' lane while QLIP's stage 2 still trains (``_baselines_lane``)."""
    from ..eval.recon import FeatureStats
    real = FeatureStats()
    real.update(real_image_features(model, data, fid, n, batch_size))
    return real


def merge_stages(stage1_dir: str, stage2_dir: str):
    """Stage-2 bottleneck + decoder into the stage-1 model (same frozen encoder, keeps the text tower)."""
    from ..io import load
    s1, s2 = load(stage1_dir), load(stage2_dir)
    d1, d2 = s1.config.decoder, s2.config.decoder
    if (d1.head, d1.head_channels) != (d2.head, d2.head_channels):  # stage 2 replaced the pixel head
        s1 = s1.with_decoder_head(d2.head, d2.head_channels)
    for a, b in zip(s1.visual.state_dict().values(), s2.visual.state_dict().values()):
        if not torch.equal(a, b):
            raise RuntimeError("stage 2 changed the vision encoder; it must stay frozen")
    s1.bottleneck.load_state_dict(s2.bottleneck.state_dict())
    s1.decoder.load_state_dict(s2.decoder.state_dict())
    return s1


def _curves(run_dirs: Dict[str, str]) -> Dict[str, list]:
    curves = {}
    for name, d in run_dirs.items():
        path = os.path.join(d, "log.jsonl")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        for key in PLOTTED_LOSSES:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                curves[f"{name}: {key}"] = pts
    return curves


def _grid(rows: List[torch.Tensor], labels: List[str], path: str) -> None:
    """Rows of [0,1] image batches -> one labelled PNG."""
    from PIL import Image, ImageDraw
    n, size, pad, left = rows[0].shape[0], rows[0].shape[-1], 2, 110
    scale = 2
    W, H = left + n * (size * scale + pad), len(rows) * (size * scale + pad)
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (row, label) in enumerate(zip(rows, labels)):
        y0 = i * (size * scale + pad)
        draw.text((4, y0 + size * scale // 2 - 6), label, fill="black")
        for j, im in enumerate(row):
            arr = (im.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
            tile = Image.fromarray(arr).resize((size * scale, size * scale), Image.NEAREST)
            canvas.paste(tile, (left + j * (size * scale + pad), y0))
    canvas.save(path)


BASELINES_LANE = "the baselines' lane (CLIP-only / reconstruction-only: training, then evaluation)"  # in errors


def _lane(jobs, out: str, resume: bool, threads: int) -> Dict[str, Any]:
    """Train ``[(run name, recipe file, overrides)]`` one after the other with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    return {name: _run(name, _recipe(cfg, ov), out, resume) for name, cfg, ov in jobs}


def _evaluate_run(name: str, model, split: str, path: str, lpips_module, fid, fid_reference, rfid_n) -> Dict[str, Any]:
    """``evaluate`` with what the demo measures for the run ``name`` on ``split``: LPIPS for the models
    that reconstruct, rFID for QLIP's two stages on test, the shape judge on test reconstructions."""
    recon = name != "clip_only"
    with_fid = fid if (recon and name != "recon_only" and split == "test") else None
    return evaluate(model, path, lpips_module if recon else None, fid=with_fid, fid_reference=fid_reference,
                    rfid_n=rfid_n, judge=recon and split == "test")


def _baselines_lane(jobs, out: str, resume: bool, threads: int, splits: Dict[str, str],
                    fid_n: int, stage1_done=None) -> Dict[str, Any]:
    """The spawned lane: the baselines' trainings (``_lane``), then their evaluation on ``splits``
    (``{split: shards}``) under ``"_eval"`` and the test originals' FID statistics (the first ``fid_n``)
    under ``"_fid_reference"`` (None when Inception cannot be built: the main process says why).
    With ``stage1_done`` (a queue into which QLIP's lane puts stage 1's final model once it is
    trained) it then also evaluates QLIP's stage 1, waiting for it if need be. On the demo's 2
    cores this lane's trainings end ~60 s before QLIP's stage 2 does and stage 1 ~150 s before them,
    so what it evaluates here costs the demo no wall time (``_evaluate_run``: the same measurement
    as in the main process)."""
    from ..eval.recon import build_lpips, inception_extractor
    from ..io import load
    s = _lane(jobs, out, resume, threads)
    models = {name: load(s[name]["final_model"]) for name, _, _ in jobs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-trunk warning: metrics.json carries the label
        lpips_module, _ = build_lpips(LPIPS_NET)
    ev = {split: {name: _evaluate_run(name, m, split, path, lpips_module, None, None, fid_n)
                  for name, m in models.items()} for split, path in splits.items()}
    try:
        fid = inception_extractor()
    except QLIPError:
        fid = None
    any_model = next(iter(models.values()))  # every demo model preprocesses alike
    ref = None if fid is None else fid_reference_stats(any_model, splits["test"], fid, fid_n)
    if stage1_done is not None:
        stage1 = load(stage1_done.get())  # waits for QLIP's lane's stage 1 (if that lane fails, we are terminated)
        for split, path in splits.items():
            ev[split]["qlip_stage1"] = _evaluate_run("qlip_stage1", stage1, split, path, lpips_module, fid,
                                                     ref if split == "test" else None, fid_n)
    return {**s, "_eval": ev, "_fid_reference": ref}


def stage2_dir_name(stage2_steps: Optional[int]) -> str:
    """The stage-2 run's folder: ``qlip_stage2`` for the recipe's steps, ``qlip_stage2_<N>steps`` for
    ``--stage2-steps N``, so that a longer stage 2 never continues (or reuses) another length's run
    and ``--resume --stage2-steps N`` on a finished demo trains only the new stage 2."""
    return "qlip_stage2" if stage2_steps is None else f"qlip_stage2_{stage2_steps}steps"


def _qlip_lane(common: List[str], s2_common: List[str], out: str, resume: bool,
               s2_name: str = "qlip_stage2", stage1_done=None) -> Dict[str, Any]:
    """QLIP stage 1, then stage 2 (in ``out/s2_name``) initialised from stage 1's final model; stage
    1's final model goes into the queue ``stage1_done`` (if given) as soon as it exists."""
    s = {"qlip_stage1": _run("qlip_stage1", _recipe("demo-stage1.yaml", common), out, resume)}
    s1_final = s["qlip_stage1"]["final_model"]
    if stage1_done is not None:
        stage1_done.put(s1_final)  # the baselines' lane evaluates it while stage 2 trains
    s["qlip_stage2"] = _run(s2_name, _recipe("demo-stage2.yaml", s2_common + [f"model.init={s1_final}"]),
                            out, resume, upstream_new=not s["qlip_stage1"]["reused"])
    return s


def run_demo(out: str = "runs/demo", fast: bool = False, resume: bool = False, threads: Optional[int] = None,
             lanes: Optional[int] = None, recipe: str = "demo", stage2_steps: Optional[int] = None,
             precision: Optional[str] = None) -> Dict[str, Any]:
    """``threads``: torch threads in all (default: torch's default, the cores); ``lanes``: 1 runs the
    four trainings one after the other, 2 (the default with >= 2 threads) runs QLIP stage 1 -> 2
    and the two baselines in two processes at once, ``threads // 2`` threads each. ``recipe``:
    ``"demo"`` (the tuned demo recipe) or ``"paper"`` (the paper's recipe at the same scale,
    ``RECIPES``). ``stage2_steps``: QLIP stage 2's steps instead of the recipe's (1,100): the judge's
    kind on reconstructions rises with them (docs/demo.md "Tenth round"); the run goes to its own
    folder (``stage2_dir_name``), the rest of the demo is unchanged. ``precision``: the four trainings'
    ``train.precision`` (``fp32`` / ``bf16`` / ``auto``) instead of the recipes' fp32; the evaluation
    always runs in fp32."""
    from ..data.shapes import generate_shapes
    t_start = time.time()
    if lanes not in (None, 1, 2):
        raise ValueError(f"lanes must be 1 or 2, got {lanes!r}")
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if stage2_steps is not None and stage2_steps < 1:
        raise ValueError(f"stage2_steps must be >= 1, got {stage2_steps!r}")
    if precision not in (None, "fp32", "bf16", "auto"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    _claim_out(out, fast, resume, recipe)
    n_train, n_heldout, n_val = (FAST_N, FAST_HELDOUT, FAST_VAL) if fast else (DATA_N, DATA_HELDOUT, DATA_VAL)
    data_dir = os.path.join(out, "data-fast" if fast else "data")  # a --fast run never touches the full data
    print(f"[demo] data: {n_train} captioned training images, {n_val} labelled validation and {n_heldout} "
          f"labelled test (held-out) images in {data_dir}")
    try:
        generate_shapes(data_dir, n=n_train, size=IMAGE_SIZE, seed=0, heldout_n=n_heldout, val_n=n_val,
                        shard_size=SHARD, progress=True, workers=os.cpu_count() or 1)
    except DataError as exc:
        raise DataError(f"{exc}; the demo does not overwrite data: delete {data_dir} or use another --out") from None
    t_data = time.time() - t_start
    train_glob = os.path.join(data_dir, "shapes-train-*.tar")
    heldout = os.path.join(data_dir, "shapes-heldout-*.tar")
    val = os.path.join(data_dir, "shapes-val-*.tar")
    fast_ov = ["data.batch_size=16", "optim.warmup_steps=2", "train.log_every=2", "train.ckpt_every=4",
               "train.progress=false"]
    prec = []
    if precision is not None:
        prec = [f"train.precision={precision}"]
        print(f"[demo] trainings in train.precision={precision} (the recipes say fp32)")
    common = ([f"data.train={train_glob}"] + RECIPES[recipe]["stage1"] + prec
              + (["optim.steps=8"] + fast_ov if fast else []))
    s2_common = ([f"data.train={train_glob}"] + RECIPES[recipe]["stage2"] + prec
                 + (["optim.steps=4", "gan.disc_start=2"] + fast_ov if fast else [])
                 + ([] if stage2_steps is None else [f"optim.steps={stage2_steps}"]))
    s2_name = stage2_dir_name(stage2_steps)
    baselines = [
        ("clip_only", "demo-stage1.yaml", common + ["loss.alpha_r=0", "loss.alpha_q=0", "loss.alpha_z=0"]),
        ("recon_only", "demo-stage1.yaml", common + ["loss.alpha_a=0", "model.drop_text=true"]
         + RECIPES[recipe]["recon_only"]),
    ]
    cores = threads or torch.get_num_threads()
    lanes = 2 if (lanes is None and cores >= 2) else (lanes or 1)
    per_lane = max(1, cores // lanes)
    summaries: Dict[str, Any] = {}
    rfid_n = FAST_RFID_N if fast else RFID_N
    # what the baselines' lane evaluated: the test originals' Inception statistics, the baselines' and
    # QLIP stage 1's results
    fid_ref, lane_ev = None, {}
    t0 = time.time()
    if lanes == 2:
        # two independent lanes, one process each: QLIP stage 1 -> stage 2 here, the baselines in a
        # spawned process. Small models use few threads badly; on 2 cores two 1-thread lanes train
        # ~1.15x faster than one 2-thread lane (benchmarks/demo_lanes.py, docs/demo.md "Third round").
        from .lanes import run_two_lanes
        print(f"[demo] two lanes of {per_lane} thread(s): QLIP stage 1 -> stage 2 | CLIP-only -> reconstruction-only "
              "(the baselines' progress is logged to their log.jsonl)")
        quiet = [(n, c, ov + ["train.progress=false"]) for n, c, ov in baselines]
        torch.set_num_threads(per_lane)
        import multiprocessing
        stage1_done = multiprocessing.get_context("spawn").Queue()  # QLIP's lane -> the baselines' lane
        try:
            mine, theirs = run_two_lanes(lambda: _qlip_lane(common, s2_common, out, resume, s2_name, stage1_done),
                                         _baselines_lane, (quiet, out, resume, per_lane,
                                                           {"validation": val, "test": heldout}, rfid_n,
                                                           stage1_done),
                                         name="qlip-demo-baselines",
                                         what=BASELINES_LANE, hint="; rerun with --resume to continue it")
            fid_ref, lane_ev = theirs.pop("_fid_reference"), theirs.pop("_eval")
            summaries.update(mine)
            summaries.update(theirs)
        finally:
            torch.set_num_threads(cores)
    else:
        torch.set_num_threads(cores)
        summaries.update(_qlip_lane(common, s2_common, out, resume, s2_name))
        summaries.update(_lane(baselines, out, resume, cores))
    t_train = time.time() - t0
    dirs = {name: os.path.join(out, name) for name in ("qlip_stage1", "clip_only", "recon_only")}
    dirs["qlip_stage2"] = os.path.join(out, s2_name)
    timings = {name: float(summaries[name].get("elapsed_s", 0.0)) for name in dirs}  # training time, also when reused
    s1_final = summaries["qlip_stage1"]["final_model"]

    # ---- evaluation ------------------------------------------------------------------------
    from ..io import load
    t0 = time.time()
    print("[demo] evaluating on the validation split (recipe checks) and the held-out test split (reported)")
    from ..eval.recon import build_lpips, inception_extractor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-trunk warning: the label in metrics.json says it
        lpips_module, lpips_label = build_lpips(LPIPS_NET)
    try:
        fid = inception_extractor()
    except QLIPError as exc:
        print(f"[demo] rFID skipped: {exc}")
        fid = None
    final = merge_stages(s1_final, summaries["qlip_stage2"]["final_model"])
    final.save_pretrained(os.path.join(out, "qlip"))
    models = {"qlip_stage1": load(s1_final), "qlip": final, "clip_only": load(summaries["clip_only"]["final_model"]),
              "recon_only": load(summaries["recon_only"]["final_model"])}
    ev: Dict[str, Dict[str, Any]] = {}
    for split, path in (("validation", val), ("test", heldout)):
        # the originals' Inception statistics, shared by the models (the test split's from the lanes)
        ref = fid_ref if split == "test" else None
        ev[split] = {}
        for name, model in models.items():
            if name in lane_ev.get(split, {}):
                ev[split][name] = lane_ev[split][name]
                continue
            ev[split][name] = _evaluate_run(name, model, split, path, lpips_module, fid, ref, rfid_n)
            ref = ev[split][name].get("_fid_reference", ref)
    metrics: Dict[str, Any] = {
        # the final QLIP's headline numbers, flat, for the report's Table-2 row and `qlip eval compare`
        "model": "qlip-demo (stage 1 + 2)" + ("" if recipe == "demo" else f", {recipe} recipe"), "recipe": recipe,
        "num_bits": final.num_bits, "compression_ratio": final.compression_ratio(),
        **_split_metrics(ev["test"]),
        "validation": _split_metrics(ev["validation"]),
        "architecture": {"preset": "qlip-demo", "image_size": final.image_size, "patch_size": final.patch_size,
                         "num_bits": final.num_bits, "compression_ratio": final.compression_ratio(),
                         "parameters": final.num_params()},
        "lpips_backbone": lpips_label,
        "splits": {"validation": ev["validation"]["qlip"]["n_images"], "test": ev["test"]["qlip"]["n_images"],
                   "rfid_test_images": ev["test"]["qlip"].get("rfid_n")},
        "timings_s": {"data": round(t_data, 1), **{k: round(v, 1) for k, v in timings.items()},
                      "training_wall": round(t_train, 1), "lanes": lanes,
                      # the runs the baselines' lane evaluated (while QLIP's stage 2 trained)
                      "evaluated_in_lane": sorted(lane_ev.get("test", {})), "eval": None, "total": None},
        "fast": fast,
        "stage2_steps": int(summaries["qlip_stage2"].get("steps", 0)),
        "training_precision": {name: summaries[name].get("precision") for name in dirs},
    }
    metrics["robustness"] = _robustness(models, metrics, FAST_ALT_N if fast else ALT_N)
    metrics["checks"] = _checks(metrics)
    metrics["validation"]["checks"] = _checks(metrics["validation"])
    metrics["timings_s"]["eval"] = round(time.time() - t0, 1)
    metrics["timings_s"]["total"] = round(time.time() - t_start, 1)
    _report(out, metrics, ev["test"], dirs)
    _print_summary(metrics, out)
    return metrics


def _claim_out(out: str, fast: bool, resume: bool, recipe: str = "demo") -> None:
    """Record what kind of run ``out`` holds; ``--resume`` of the other kind is refused (a
    --fast run's checkpoints have other settings than a full run's, and vice versa; so do the
    checkpoints of another ``--recipe``)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, RUN_MARKER)
    if resume and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            held = json.load(f)
        was_fast, was_recipe = bool(held.get("fast")), held.get("recipe", "demo")
        if was_recipe != recipe:
            raise QLIPError(f"{out} holds a run of --recipe {was_recipe}: --resume with --recipe {recipe} cannot "
                            f"continue it; use another --out (e.g. --out {out.rstrip(os.sep)}-{recipe})")
        if was_fast != fast:
            kind = "a --fast (smoke) run" if was_fast else "a full run"
            raise QLIPError(f"{out} holds {kind}: --resume {'with' if fast else 'without'} --fast cannot continue "
                            f"it; use another --out (e.g. --out {out.rstrip(os.sep)}-{'fast' if fast else 'full'}) "
                            "or rerun without --resume")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"fast": fast, "recipe": recipe}, f)


def _split_metrics(ev: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The metrics.json block of one split (accuracies as fractions)."""
    q, c, r, s1 = ev["qlip"], ev["clip_only"], ev["recon_only"], ev["qlip_stage1"]
    out = {
        "zero_shot_top1": q["zero_shot_top1"], "psnr": q["psnr"], "ssim": q["ssim"], "lpips": q["lpips"],
        "rfid": q.get("rfid"),  # stage 2, on the first RFID_N test images (None on validation)
        "qlip": {"zero_shot_top1": q["zero_shot_top1"], "zero_shot_top1_recon": q["zero_shot_top1_recon"],
                 "colour_acc": q["colour_acc"], "kind_acc": q["kind_acc"], "psnr": q["psnr"], "ssim": q["ssim"],
                 "psnr_stage1": s1["psnr"], "lpips_stage1": s1["lpips"], "lpips_stage2": q["lpips"],
                 "rfid_stage1": s1.get("rfid"), "rfid_stage2": q.get("rfid"), "codes": q["codes"]},
        "clip_only": {"zero_shot_top1": c["zero_shot_top1"], "colour_acc": c["colour_acc"], "kind_acc": c["kind_acc"]},
        "recon_only": {"psnr": r["psnr"], "ssim": r["ssim"], "lpips": r["lpips"]},
    }
    for key, e in (("qlip", q), ("recon_only", r)):
        if "judge_colour_acc" in e:
            out[key]["judge_colour_acc"], out[key]["judge_kind_acc"] = e["judge_colour_acc"], e["judge_kind_acc"]
    if "judge_colour_acc" in s1:  # what stage 2 adds for the judge
        out["qlip"]["judge_colour_acc_stage1"], out["qlip"]["judge_kind_acc_stage1"] = (s1["judge_colour_acc"],
                                                                                      s1["judge_kind_acc"])
    return out


def _robustness(models: Dict[str, Any], metrics: Dict[str, Any], n: int) -> Dict[str, Any]:
    """Zero-shot on ``n`` images of the second renderer (``qlip.eval.shapes_alt``: other drawing
    code, proportions, outlines, blur, noise, backgrounds; docs/evaluation.md "Second renderer")
    next to the test split's: how much of the accuracy is shapes rather than this generator's pixels."""
    from ..eval.shapes_alt import evaluate_alt
    out: Dict[str, Any] = {"renderer": "qlip.eval.shapes_alt", "n_images": n, "seed": 0}
    for name in ("qlip", "clip_only"):
        r = evaluate_alt(models[name], n=n, seed=0, judge=False)
        out[name] = {k: r[k] for k in ("zero_shot_top1", "colour_acc", "kind_acc")}
        out[name]["by_style"] = {k: v["zero_shot_top1"] for k, v in r["by_style"].items()}
        out[name]["test_zero_shot_top1"] = metrics[name]["zero_shot_top1"]
    return out


def _checks(m: Dict[str, Any]) -> Dict[str, Optional[bool]]:
    """The acceptance criteria, evaluated on one split's metrics (``_split_metrics``).

    "stage 2 improves the decoder" is the paper's Table 3c measure, rFID with the real FID
    Inception; it is ``None`` (not measured) when rFID was not computed on that split.
    """
    q, c, r = m["qlip"], m["clip_only"], m["recon_only"]
    rfid1, rfid2 = q.get("rfid_stage1"), q.get("rfid_stage2")
    return {
        "zero_shot_top1 >= 0.60": q["zero_shot_top1"] >= 0.60,
        "psnr >= 25 dB": q["psnr"] >= 25.0,
        "recon zero-shot within 10 points": q["zero_shot_top1"] - q["zero_shot_top1_recon"] <= 0.10,
        "within 10% of CLIP-only zero-shot": q["zero_shot_top1"] >= 0.9 * c["zero_shot_top1"],
        "within 1 dB of recon-only PSNR": q["psnr"] >= r["psnr"] - 1.0,
        "stage 2 lowers rFID": None if rfid1 is None or rfid2 is None else rfid2 < rfid1,
    }


def _report(out: str, metrics: Dict[str, Any], ev: Dict[str, Any], dirs: Dict[str, str]) -> None:
    from ..eval.report import write_report
    orig = ev["qlip"]["_images"][0]
    grid_path = os.path.join(out, "recon_rows.png")
    _grid([orig, ev["qlip_stage1"]["_images"][1], ev["qlip"]["_images"][1], ev["recon_only"]["_images"][1]],
          ["original", "QLIP (stage 1)", "QLIP (stage 2)", "recon-only"], grid_path)
    from ..eval.common import format_accuracy as pct
    q, c, r = metrics["qlip"], metrics["clip_only"], metrics["recon_only"]
    fmt = lambda v, digits=2: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    judge = lambda m, s="": ("-" if f"judge_kind_acc{s}" not in m  # noqa: E731
                             else f"{pct(m[f'judge_colour_acc{s}'])} / {pct(m[f'judge_kind_acc{s}'])}")
    table = [
        [f"QLIP (stage 1 + 2; stage 2: {metrics['stage2_steps']} steps)", pct(q["zero_shot_top1"]), pct(q["zero_shot_top1_recon"]), pct(q["colour_acc"]),
         pct(q["kind_acc"]), fmt(q["psnr"]), fmt(q["rfid_stage2"]), judge(q), fmt(q["lpips_stage2"], 4)],
        ["QLIP after stage 1", "", "", "", "", fmt(q["psnr_stage1"]), fmt(q["rfid_stage1"]), judge(q, "_stage1"),
         fmt(q["lpips_stage1"], 4)],
        ["CLIP-only", pct(c["zero_shot_top1"]), "-", pct(c["colour_acc"]), pct(c["kind_acc"]), "-", "-", "-", "-"],
        ["reconstruction-only", "-", "-", "-", "-", fmt(r["psnr"]), "-", judge(r), fmt(r["lpips"], 4)],
    ]
    write_report(out, metrics, originals=orig, reconstructions=ev["qlip"]["_images"][1],
                 bit_usage=ev["qlip"]["_bit_p1"], loss_curves=_curves(dirs), title="qlip demo: QLIP on captioned shapes",
                 tables=[("Understanding vs reconstruction (held-out test split, 32 classes)",
                          ["model", "zero-shot top-1", "zero-shot on recon", "colour acc", "kind acc", "PSNR (dB)",
                           f"rFID ({metrics['splits']['rfid_test_images']} images)",
                           "judge on recon (colour / kind)", f"LPIPS ({metrics['lpips_backbone']})"], table),
                         ("Acceptance checks (test split; validation in metrics.json)", ["check", "passed"],
                          [[k, _check_word(v, metrics["fast"])] for k, v in metrics["checks"].items()])],
                 extra_figures=[("Originals and reconstructions of each model", grid_path)])


def _check_word(ok: Optional[bool], fast: bool) -> str:
    if ok is None:
        return "not measured"
    return "ok" if ok else "MISS" + (" (expected for --fast)" if fast else "")


def _print_summary(m: Dict[str, Any], out: str) -> None:
    from ..eval.common import format_accuracy as pct
    q, c, r = m["qlip"], m["clip_only"], m["recon_only"]
    rfid = ("" if q.get("rfid_stage2") is None else
            f", rFID stage 1 {q['rfid_stage1']:.2f} -> stage 2 {q['rfid_stage2']:.2f} ({m['splits']['rfid_test_images']} images)")
    judge = ("" if "judge_kind_acc" not in q else
             f"; judge on reconstructions: colour {pct(q['judge_colour_acc'])}, kind {pct(q['judge_kind_acc'])}"
             + ("" if "judge_kind_acc_stage1" not in q else
                f" (after stage 1: {pct(q['judge_colour_acc_stage1'])}, {pct(q['judge_kind_acc_stage1'])})"))
    print(f"\n[demo] test split ({m['splits']['test']} images; recipe checks also on {m['splits']['validation']} "
          "validation images, in metrics.json)")
    print(f"[demo] QLIP (stage 2: {m['stage2_steps']} steps) zero-shot {pct(q['zero_shot_top1'])} (on reconstructions "
          f"{pct(q['zero_shot_top1_recon'])}; colour {pct(q['colour_acc'])}, kind {pct(q['kind_acc'])}), "
          f"PSNR {q['psnr']:.2f} dB{rfid}{judge}")
    print(f"[demo] CLIP-only zero-shot {pct(c['zero_shot_top1'])}   recon-only PSNR {r['psnr']:.2f} dB   "
          f"LPIPS ({m['lpips_backbone']}) stage 1 {q['lpips_stage1']:.4f} -> stage 2 {q['lpips_stage2']:.4f}")
    if "robustness" in m:
        a, ac = m["robustness"]["qlip"], m["robustness"]["clip_only"]
        print(f"[demo] second renderer ({m['robustness']['n_images']} images): QLIP zero-shot {pct(a['zero_shot_top1'])} "
              f"(colour {pct(a['colour_acc'])}, kind {pct(a['kind_acc'])}), CLIP-only {pct(ac['zero_shot_top1'])}")
    for k, v in m["checks"].items():
        print(f"[demo]   {_check_word(v, m['fast']):<4} {k}")
    print(f"[demo] total {m['timings_s']['total']:.0f} s; report: {os.path.join(out, 'report.html')}; "
          f"model: {os.path.join(out, 'qlip')}")
