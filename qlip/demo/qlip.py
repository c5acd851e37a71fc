"""``qlip demo``: the README's main job, a tiny end-to-end QLIP run on generated shapes.

1. generate the captioned-shapes shards (if missing): 64x64 images, 1-3 shapes, captions;
2. stage 1 (QLIP: MSE + BSQ + contrastive, AdamW, frozen random text tower), stage 2 (encoder
   frozen, text dropped: MSE + BSQ + embedding consistency through the frozen encoder, AdamW);
3. the paper's Figure 1 / Table 3a in miniature: a CLIP-only and a reconstruction-only model
   of the same size and budget;
4. evaluation on the labelled held-out split (32 classes "a photo of a {colour} {kind}"):
   zero-shot top-1 on the originals and on the reconstructions, colour and kind accuracy, PSNR,
   SSIM, LPIPS after stage 1 and after stage 2, code usage;
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

import torch

log = logging.getLogger("qlip.demo")

DATA_N, DATA_HELDOUT, IMAGE_SIZE, SHARD = 10240, 640, 64, 512
LPIPS_NET = "alex"  # the metric's trunk (also stage 2's loss): VGG-16 costs more than the model here


def _recipe(name: str, overrides: List[str]):
    from ..train.recipe import load_recipe
    path = resources.files("qlip") / "configs" / name
    with resources.as_file(path) as p:
        return load_recipe(str(p), overrides)


def _run(name: str, recipe, out_dir: str, resume: bool) -> Dict[str, Any]:
    from ..train.engine import train
    from ..train.state import latest_checkpoint
    run_dir = os.path.join(out_dir, name)
    summ = os.path.join(run_dir, "summary.json")
    if resume and os.path.isfile(summ):
        with open(summ, encoding="utf-8") as f:
            s = json.load(f)
        if s.get("steps") == recipe.optim.steps and os.path.isdir(s.get("final_model", "")):
            print(f"[demo] {name}: finished earlier, reusing {s['final_model']}")
            return s
    again = resume and latest_checkpoint(os.path.join(run_dir, "checkpoints")) is not None
    print(f"[demo] {name}: {recipe.optim.steps} steps x batch {recipe.data.batch_size}"
          + (" (resuming)" if again else ""))
    t0 = time.time()
    s = train(recipe, run_dir, resume=again)
    print(f"[demo] {name}: done in {time.time() - t0:.0f} s, last losses "
          + ", ".join(f"{k}={v:.4g}" for k, v in s["last_log"].items()
                      if k in ("contrastive", "mse", "lpips", "quant", "g_gan")))
    return s


@torch.no_grad()
def evaluate(model, heldout: str, lpips_module=None, batch_size: int = 128, keep: int = 8,
             limit: Optional[int] = None) -> Dict[str, Any]:
    """Zero-shot (originals and reconstructions), colour/kind accuracy, PSNR, SSIM, LPIPS, codes."""
    from ..data.evalsets import open_dataset
    from ..data.shapes import KINDS, SHAPE_CLASSNAMES
    from ..eval.codes import CodeStats
    from ..eval.recon import psnr_per_image, ssim_per_image
    from ..eval.zeroshot import zero_shot_classifier
    from ..model.preprocess import denormalize
    model.eval()
    ds = open_dataset(heldout)
    has_text = model.text is not None
    clf = zero_shot_classifier(model, list(SHAPE_CLASSNAMES), ["a photo of a {}"]) if has_text else None
    k = len(KINDS)
    acc = {"top1": 0, "recon_top1": 0, "colour": 0, "kind": 0}
    psnr, ssim, lp, n = [], [], [], 0
    codes = CodeStats(model.num_bits, model.config.quantizer.group_size)
    originals, recons = [], []
    for x, y in ds.batches(model.preprocess, batch_size, limit):
        p = model.image_pass(x, embed=True, quant_loss=False)  # one pass: embedding, ids, reconstruction
        codes.update(p.ids)
        r = p.recon
        a = denormalize(r, model.image_mean, model.image_std).clamp(0, 1)
        b = denormalize(x, model.image_mean, model.image_std).clamp(0, 1)
        psnr.append(psnr_per_image(a, b))
        ssim.append(ssim_per_image(a, b))
        if lpips_module is not None:
            lp.append(lpips_module(a * 2 - 1, b * 2 - 1))
        if has_text:
            pred = (p.image_embeds.float() @ clf).argmax(-1)
            pred_r = (model.encode_image(r, normalize=True).float() @ clf).argmax(-1)
            acc["top1"] += int((pred == y).sum())
            acc["recon_top1"] += int((pred_r == y).sum())
            acc["colour"] += int((pred // k == y // k).sum())
            acc["kind"] += int((pred % k == y % k).sum())
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
    cs = codes.compute()
    out["codes"] = {k2: cs[k2] for k2 in ("distinct_ids", "used_code_fraction", "bit_entropy_mean") if k2 in cs}
    out["_bit_p1"] = cs.get("bit_p1")
    out["_images"] = (torch.stack(originals), torch.stack(recons))
    return out


def merge_stages(stage1_dir: str, stage2_dir: str):
    """Stage-2 bottleneck + decoder into the stage-1 model (same frozen encoder, keeps the text tower)."""
    from ..io import load
    s1, s2 = load(stage1_dir), load(stage2_dir)
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
        for key in ("contrastive", "mse", "lpips"):
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


def _lane(jobs, out: str, resume: bool, threads: int) -> Dict[str, Any]:
    """Train ``[(run name, recipe file, overrides)]`` one after the other with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    return {name: _run(name, _recipe(cfg, ov), out, resume) for name, cfg, ov in jobs}


def _lane_process(jobs, out: str, resume: bool, threads: int, results) -> None:
    """Entry point of the spawned baselines process: ``("ok", summaries)`` or ``("error", text)``."""
    import traceback
    try:
        results.put(("ok", _lane(jobs, out, resume, threads)))
    except Exception:  # reported to the parent, which raises it
        results.put(("error", traceback.format_exc()))


def _wait_for_lane(proc, results, poll_s: float = 5.0) -> Dict[str, Any]:
    import queue
    while True:
        try:
            status, payload = results.get(timeout=poll_s)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the baselines' training process ended without a result "
                                   f"(exit code {proc.exitcode}); rerun with --resume to continue it") from None
    if status != "ok":
        raise RuntimeError("the baselines' training (CLIP-only / reconstruction-only) failed:\n" + payload)
    return payload


def _qlip_lane(common: List[str], s2_common: List[str], out: str, resume: bool) -> Dict[str, Any]:
    """QLIP stage 1, then stage 2 initialised from stage 1's final model."""
    s = {"qlip_stage1": _run("qlip_stage1", _recipe("demo-stage1.yaml", common), out, resume)}
    s1_final = s["qlip_stage1"]["final_model"]
    s["qlip_stage2"] = _run("qlip_stage2", _recipe("demo-stage2.yaml", s2_common + [f"model.init={s1_final}"]),
                            out, resume)
    return s


def run_demo(out: str = "runs/demo", fast: bool = False, resume: bool = False, threads: Optional[int] = None,
             lanes: Optional[int] = None) -> Dict[str, Any]:
    """``threads``: torch threads in all (default: torch's default, the cores); ``lanes``: 1 runs the
    four trainings one after the other, 2 (the default with >= 2 threads) runs QLIP stage 1 -> 2
    and the two baselines in two processes at once, ``threads // 2`` threads each."""
    from ..data.shapes import generate_shapes
    t_start = time.time()
    if lanes not in (None, 1, 2):
        raise ValueError(f"lanes must be 1 or 2, got {lanes!r}")
    os.makedirs(out, exist_ok=True)
    n_train, n_heldout = (320, 128) if fast else (DATA_N, DATA_HELDOUT)
    data_dir = os.path.join(out, "data")
    print(f"[demo] data: {n_train} captioned training images + {n_heldout} labelled held-out images in {data_dir}")
    generate_shapes(data_dir, n=n_train, size=IMAGE_SIZE, seed=0, heldout_n=n_heldout, shard_size=SHARD,
                    overwrite=True, progress=True, workers=os.cpu_count() or 1)
    t_data = time.time() - t_start
    train_glob = os.path.join(data_dir, "shapes-train-*.tar")
    heldout = os.path.join(data_dir, "shapes-heldout-*.tar")
    fast_ov = ["data.batch_size=32", "optim.warmup_steps=2", "train.log_every=2", "train.ckpt_every=4",
               "train.progress=false"]
    common = [f"data.train={train_glob}"] + (["optim.steps=8"] + fast_ov if fast else [])
    s2_common = [f"data.train={train_glob}"] + (["optim.steps=4", "gan.disc_start=2"] + fast_ov if fast else [])
    baselines = [
        ("clip_only", "demo-stage1.yaml", common + ["loss.alpha_r=0", "loss.alpha_q=0", "loss.alpha_z=0"]),
        ("recon_only", "demo-stage1.yaml", common + ["loss.alpha_a=0", "model.drop_text=true"]),
    ]
    cores = threads or torch.get_num_threads()
    lanes = 2 if (lanes is None and cores >= 2) else (lanes or 1)
    per_lane = max(1, cores // lanes)
    summaries: Dict[str, Any] = {}
    t0 = time.time()
    if lanes == 2:
        # two independent lanes, one process each: QLIP stage 1 -> stage 2 here, the baselines in a
        # spawned process. Small models use few threads badly; on 2 cores two 1-thread lanes train
        # ~1.15x faster than one 2-thread lane (benchmarks/demo_lanes.py, docs/demo.md "Third round").
        import multiprocessing
        print(f"[demo] two lanes of {per_lane} thread(s): QLIP stage 1 -> stage 2 | CLIP-only -> reconstruction-only "
              "(the baselines' progress is logged to their log.jsonl)")
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        quiet = [(n, c, ov + ["train.progress=false"]) for n, c, ov in baselines]
        other = ctx.Process(target=_lane_process, args=(quiet, out, resume, per_lane, results), name="qlip-demo-baselines")
        other.start()
        torch.set_num_threads(per_lane)
        try:
            summaries.update(_qlip_lane(common, s2_common, out, resume))
            summaries.update(_wait_for_lane(other, results))
        except BaseException:
            if other.is_alive():  # fail fast: do not train the baselines for nothing
                other.terminate()
            raise
        finally:
            other.join()
            torch.set_num_threads(cores)
    else:
        torch.set_num_threads(cores)
        summaries.update(_qlip_lane(common, s2_common, out, resume))
        summaries.update(_lane(baselines, out, resume, cores))
    t_train = time.time() - t0
    dirs = {name: os.path.join(out, name) for name in ("qlip_stage1", "clip_only", "recon_only", "qlip_stage2")}
    timings = {name: float(summaries[name].get("elapsed_s", 0.0)) for name in dirs}  # training time, also when reused
    s1_final = summaries["qlip_stage1"]["final_model"]

    # ---- evaluation ------------------------------------------------------------------------
    from ..io import load
    t0 = time.time()
    print("[demo] evaluating on the held-out split")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the LPIPS random-trunk warning is reported in metrics.json
        from ..eval.recon import build_lpips
        lpips_module, lpips_label = build_lpips(LPIPS_NET)
    final = merge_stages(s1_final, summaries["qlip_stage2"]["final_model"])
    final.save_pretrained(os.path.join(out, "qlip"))
    ev = {
        "qlip_stage1": evaluate(load(s1_final), heldout, lpips_module),
        "qlip": evaluate(final, heldout, lpips_module),
        "clip_only": evaluate(load(summaries["clip_only"]["final_model"]), heldout),
        "recon_only": evaluate(load(summaries["recon_only"]["final_model"]), heldout, lpips_module),
    }
    q, c, r, s1 = ev["qlip"], ev["clip_only"], ev["recon_only"], ev["qlip_stage1"]
    metrics: Dict[str, Any] = {
        # the final QLIP's headline numbers, flat, for the report's Table-2 row and `qlip eval compare`
        "model": "qlip-demo (stage 1 + 2)", "num_bits": final.num_bits, "compression_ratio": final.compression_ratio(),
        "zero_shot_top1": q["zero_shot_top1"], "psnr": q["psnr"], "ssim": q["ssim"], "lpips": q["lpips"],
        "qlip": {"zero_shot_top1": q["zero_shot_top1"], "zero_shot_top1_recon": q["zero_shot_top1_recon"],
                 "colour_acc": q["colour_acc"], "kind_acc": q["kind_acc"], "psnr": q["psnr"], "ssim": q["ssim"],
                 "psnr_stage1": s1["psnr"], "lpips_stage1": s1["lpips"], "lpips_stage2": q["lpips"],
                 "codes": q["codes"]},
        "clip_only": {"zero_shot_top1": c["zero_shot_top1"], "colour_acc": c["colour_acc"], "kind_acc": c["kind_acc"]},
        "recon_only": {"psnr": r["psnr"], "ssim": r["ssim"], "lpips": r["lpips"]},
        "model": {"preset": "qlip-demo", "image_size": final.image_size, "patch_size": final.patch_size,
                  "num_bits": final.num_bits, "compression_ratio": final.compression_ratio(),
                  "parameters": final.num_params()},
        "lpips_backbone": lpips_label,
        "timings_s": {"data": round(t_data, 1), **{k: round(v, 1) for k, v in timings.items()},
                      "training_wall": round(t_train, 1), "lanes": lanes, "eval": None, "total": None},
        "fast": fast,
    }
    metrics["checks"] = _checks(metrics)
    metrics["timings_s"]["eval"] = round(time.time() - t0, 1)
    metrics["timings_s"]["total"] = round(time.time() - t_start, 1)
    _report(out, metrics, ev, dirs)
    _print_summary(metrics, out)
    return metrics


def _checks(m: Dict[str, Any]) -> Dict[str, bool]:
    """The issue's acceptance criteria, evaluated on this run."""
    q, c, r = m["qlip"], m["clip_only"], m["recon_only"]
    return {
        "zero_shot_top1 >= 0.60": q["zero_shot_top1"] >= 0.60,
        "psnr >= 25 dB": q["psnr"] >= 25.0,
        "recon zero-shot within 10 points": q["zero_shot_top1"] - q["zero_shot_top1_recon"] <= 0.10,
        "within 10% of CLIP-only zero-shot": q["zero_shot_top1"] >= 0.9 * c["zero_shot_top1"],
        "within 1 dB of recon-only PSNR": q["psnr"] >= r["psnr"] - 1.0,
        "stage 2 lowers LPIPS": q["lpips_stage2"] < q["lpips_stage1"],
    }


def _report(out: str, metrics: Dict[str, Any], ev: Dict[str, Any], dirs: Dict[str, str]) -> None:
    from ..eval.report import write_report
    orig = ev["qlip"]["_images"][0]
    grid_path = os.path.join(out, "recon_rows.png")
    _grid([orig, ev["qlip_stage1"]["_images"][1], ev["qlip"]["_images"][1], ev["recon_only"]["_images"][1]],
          ["original", "QLIP (stage 1)", "QLIP (stage 2)", "recon-only"], grid_path)
    q, c, r = metrics["qlip"], metrics["clip_only"], metrics["recon_only"]
    fmt = lambda v, pct=False: "-" if v is None else (f"{100 * v:.1f}%" if pct else f"{v:.2f}")  # noqa: E731
    table = [
        ["QLIP (stage 1 + 2)", fmt(q["zero_shot_top1"], 1), fmt(q["zero_shot_top1_recon"], 1), fmt(q["colour_acc"], 1),
         fmt(q["kind_acc"], 1), fmt(q["psnr"]), fmt(q["lpips_stage2"])],
        ["QLIP after stage 1", "", "", "", "", fmt(q["psnr_stage1"]), fmt(q["lpips_stage1"])],
        ["CLIP-only", fmt(c["zero_shot_top1"], 1), "-", fmt(c["colour_acc"], 1), fmt(c["kind_acc"], 1), "-", "-"],
        ["reconstruction-only", "-", "-", "-", "-", fmt(r["psnr"]), fmt(r["lpips"])],
    ]
    write_report(out, metrics, originals=orig, reconstructions=ev["qlip"]["_images"][1],
                 bit_usage=ev["qlip"]["_bit_p1"], loss_curves=_curves(dirs), title="qlip demo: QLIP on captioned shapes",
                 tables=[("Understanding vs reconstruction (held-out split, 32 classes)",
                          ["model", "zero-shot top-1", "zero-shot on recon", "colour acc", "kind acc", "PSNR (dB)",
                           f"LPIPS ({metrics['lpips_backbone']})"], table),
                         ("Acceptance checks", ["check", "passed"], [[k, str(v)] for k, v in metrics["checks"].items()])],
                 extra_figures=[("Originals and reconstructions of each model", grid_path)])


def _print_summary(m: Dict[str, Any], out: str) -> None:
    q, c, r = m["qlip"], m["clip_only"], m["recon_only"]
    print(f"\n[demo] QLIP      zero-shot {100 * q['zero_shot_top1']:.1f}% (on reconstructions "
          f"{100 * q['zero_shot_top1_recon']:.1f}%; colour {100 * q['colour_acc']:.1f}%, kind {100 * q['kind_acc']:.1f}%), "
          f"PSNR {q['psnr']:.2f} dB, LPIPS stage 1 {q['lpips_stage1']:.4f} -> stage 2 {q['lpips_stage2']:.4f}")
    print(f"[demo] CLIP-only zero-shot {100 * c['zero_shot_top1']:.1f}%   recon-only PSNR {r['psnr']:.2f} dB")
    for k, v in m["checks"].items():
        print(f"[demo]   {'ok  ' if v else 'MISS'} {k}")
    print(f"[demo] total {m['timings_s']['total']:.0f} s; report: {os.path.join(out, 'report.html')}; "
          f"model: {os.path.join(out, 'qlip')}")
