"""``qlip demo vlm``: the paper's Table 6 in miniature, a LLaVA-style VLM on the demo's QLIP.

Reuses ``runs/demo`` (``qlip demo``): the QLIP model (``runs/demo/qlip``) and its
reconstruction-only baseline (``runs/demo/recon_only/final``). A tiny random Llama
(:mod:`qlip.vlm.tiny`, no download) learns shapes question answering
(:mod:`qlip.data.shapes_qa`) in LLaVA-1.5's two stages, once per vision feature:

* ``layer_-2``: QLIP's second-to-last hidden state (LLaVA's choice, the paper's; hidden states are
  numbered like transformers', so for the demo's one-block encoder it is the conv stem's output);
* ``last_layer``: QLIP's last block, before the quantizer;
* ``after_quantizer``: QLIP's binary codes (the token bits);
* ``recon_only``: the reconstruction-only encoder's second-to-last hidden state.

Outputs ``OUT/metrics.json`` (per variant ``accuracy`` and per question type ``colour``, ``kind``,
``position``, ``size``: exact-match fractions on held-out images, greedy answers; ``checks``: the
issue's targets; ``settings``: with per-variant times), ``OUT/report.html`` (the table, the
checks and example images with questions and answers) and ``OUT/vlm/`` (the ``layer_-2`` model,
a ``--model`` for ``qlip vlm chat``). With >= 2 threads the variants train in two lanes (two
processes of one thread each, two variants each), as ``qlip demo`` does.

Deviations from LLaVA-1.5, because the language model here is random, not pre-trained: stage 2
uses lr 3e-3 (LLaVA: 2e-5, which cannot teach a random LLM any words in a few hundred steps; at
1e-3 and 150 steps it had not even learnt which answers go with which question); stage 1 keeps
LLaVA's 1e-3. The demo QLIP has one encoder block (a second one cost 14 points of zero-shot at
the demo's budget, docs/demo.md "Fourth round"), so ``layer_-2`` there reads the embeddings and
``last_layer`` the one block. The frozen features are standardised per channel before the projector
(``feature_norm: standardize``, :mod:`qlip.vlm.feature_norm`): the conv stem's output is small and
offset, and with it standardised layer -2 answers position 0.94 and size 0.90 instead of 0.89 and
0.74 (docs/vlm.md, "Issue 16"; ``RECIPE`` holds the choices, benchmarks/vlm_recipe.py compares them).
Two more departures make the tiny LLM read the shape kind (docs/vlm.md, "Issue 16, third round"):
each 2x2 block of patch tokens is one LLM position (``token_merge: 2``, Qwen2-VL's merger: 16 image
positions instead of 64, each projected from a 16x16-pixel region), and at most 10% of the training
images have several shapes (``multi_shape_fraction: 0.1``; those carry only the count question, so
the default mix of about half spent half of every batch on images without a kind answer).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import time
from typing import Any, Dict, List, Optional

from ..errors import ConfigError

TYPES = ("colour", "kind", "position", "size")
VARIANTS = ("layer_-2", "last_layer", "after_quantizer", "recon_only")
FULL = {"train_images": 2000, "heldout_images": 200, "stage1_steps": 100, "stage2_steps": 2500, "batch_size": 16}
FAST = {"train_images": 48, "heldout_images": 8, "stage1_steps": 3, "stage2_steps": 3, "batch_size": 4}
STAGE1_LR, STAGE2_LR = 1e-3, 3e-3
# How the VLM is trained (docs/vlm.md, "The demo's recipe"); benchmarks/vlm_recipe.py compares choices.
RECIPE = {"feature_norm": "standardize", "multi_turn": True, "tokenizer_texts": "rendered", "vocab_size": 448,
          "max_length": 160, "llm_hidden": 64, "llm_layers": 2, "token_merge": 2,
          "multi_shape_fraction": 0.1,
          "stage1_lr": STAGE1_LR, "stage2_lr": STAGE2_LR, "stage2_projector_lr": None}


def add_arguments(p) -> None:
    p.add_argument("--demo-dir", default="runs/demo", help="the QLIP demo's output (default runs/demo)")
    p.add_argument("--out", default="runs/demo-vlm", help="output folder (default runs/demo-vlm)")
    p.add_argument("--qlip", default=None, help="QLIP model (default DEMO_DIR/qlip)")
    p.add_argument("--recon-only", default=None, help="reconstruction-only model (default DEMO_DIR/recon_only/final)")
    p.add_argument("--fast", action="store_true", help="a smoke run (a few steps, a few images)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in all (default: torch's default)")
    p.add_argument("--lanes", type=int, default=None, choices=[1, 2],
                   help="variants trained at once, one process each (default: 2 with >= 2 threads)")


def run(args) -> int:
    run_vlm_demo(args.demo_dir, args.out, fast=args.fast, threads=args.threads, qlip_path=args.qlip,
                 recon_path=args.recon_only, lanes=args.lanes)
    return 0


def _normalise(text: str) -> str:
    return text.strip().lower().strip(".!?,;:").split(" ")[0] if text.strip() else ""


def evaluate(model, records: List[Dict[str, Any]], root: str, batch_size: int = 16) -> Dict[str, Any]:
    """Exact-match accuracy (first word, lower case, no punctuation) per question type and overall,
    and the answers given."""
    from ..vlm import generate
    right = {t: 0 for t in TYPES}
    total = {t: 0 for t in TYPES}
    answers = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        got = generate(model, [os.path.join(root, r["image"]) for r in chunk],
                       [r["qa"][0]["question"] for r in chunk], max_new_tokens=4)
        for r, g in zip(chunk, got):
            qa = r["qa"][0]
            if qa["type"] not in right:
                continue
            ok = _normalise(g) == qa["answer"]
            right[qa["type"]] += int(ok)
            total[qa["type"]] += 1
            answers.append({"image": r["image"], "question": qa["question"], "answer": g, "truth": qa["answer"],
                            "correct": ok})
    out = {t: right[t] / max(total[t], 1) for t in TYPES}
    out["accuracy"] = sum(right.values()) / max(sum(total.values()), 1)
    return {"metrics": out, "answers": answers}


def _train(name: str, stage: int, model: Dict[str, Any], data: str, steps: int, batch: int, lr: float,
           out: str, train_extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from ..train import Recipe, train
    r = Recipe.from_dict({"task": "vlm", "model": model, "data": {"train": data, "batch_size": batch},
                          "optim": {"optimizer": "adamw", "lr": lr, "warmup_steps": max(1, steps // 20),
                                    "steps": steps, "weight_decay": 0.0},
                          "train": {"stage": stage, "log_every": max(1, steps // 10), "ckpt_every": 0,
                                    "progress": False, "tensorboard": False, **(train_extra or {})}})
    t0 = time.time()
    summary = train(r, out)
    took = time.time() - t0
    print(f"[demo-vlm] {name} stage {stage}: {steps} steps in {took:.0f} s, "
          f"loss {summary['last_log'].get('loss', float('nan')):.3f}", flush=True)
    return {"final": summary["final_model"], "seconds": took, "loss": summary["last_log"].get("loss")}


def _variant(name: str, vision: str, layer: int, features: str, job: Dict[str, Any]) -> Dict[str, Any]:
    """One row of the table: stage 1 (projector), stage 2 (projector + LLM), held-out evaluation."""
    from ..vlm import load
    cfg, out, rec = job["cfg"], job["out"], job["recipe"]
    t0 = time.time()
    keys = {"layer": layer, "features": features, "max_length": rec["max_length"], "feature_norm": rec["feature_norm"],
            "token_merge": rec["token_merge"]}
    s1 = _train(name, 1, {"qlip": vision, "llm": job["llm"], **keys}, job["train_json"], cfg["stage1_steps"],
                cfg["batch_size"], rec["stage1_lr"], os.path.join(out, "runs", name, "stage1"))
    plr = rec.get("stage2_projector_lr")
    s2 = _train(name, 2, {"init": s1["final"], **keys}, job["train_json"], cfg["stage2_steps"], cfg["batch_size"],
                rec["stage2_lr"], os.path.join(out, "runs", name, "stage2"),
                train_extra=None if plr is None else {"projector_lr": plr})
    t_eval = time.time()
    with open(job["heldout_json"], encoding="utf-8") as f:
        heldout = json.load(f)
    ev = evaluate(load(s2["final"]), heldout, job["data"])
    print(f"[demo-vlm] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev["metrics"].items()), flush=True)
    seconds = {"stage1": round(s1["seconds"], 1), "stage2": round(s2["seconds"], 1),
               "eval": round(time.time() - t_eval, 1), "total": round(time.time() - t0, 1)}
    return {"metrics": ev["metrics"], "answers": ev["answers"], "final": s2["final"], "seconds": seconds,
            "loss": {"stage1": s1["loss"], "stage2": s2["loss"]}}


def _tokenizer_texts(train_json: str, which: str) -> List[str]:
    """Texts the tiny LLM's BPE merges are learned from (:func:`qlip.vlm.tiny.merge_texts`):
    ``answers`` (the recipe before issue 16's fix: the turns alone) or ``rendered``."""
    from ..vlm.tiny import merge_texts
    with open(train_json, encoding="utf-8") as f:
        recs = json.load(f)
    return merge_texts(recs, "turns" if which == "answers" else which)


def prepare(out: str, cfg: Dict[str, Any], recipe: Dict[str, Any], size: int) -> Dict[str, Any]:
    """The shapes QA data (``OUT/data``) and the tiny random LLM (``OUT/tiny-llama``): the job
    every variant trains on."""
    from ..data.shapes_qa import write_shapes_qa
    from ..vlm.tiny import build_tiny_llm
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data")
    train_json = write_shapes_qa(data, cfg["train_images"], split="train", size=size,
                                 multi_turn=recipe["multi_turn"], multi_shape_fraction=recipe["multi_shape_fraction"])
    heldout_json = write_shapes_qa(data, cfg["heldout_images"], split="heldout", size=size,
                                   types=list(TYPES))
    texts = _tokenizer_texts(train_json, recipe["tokenizer_texts"])
    llm = build_tiny_llm(os.path.join(out, "tiny-llama"), texts, vocab_size=recipe["vocab_size"],
                         hidden_size=recipe["llm_hidden"], layers=recipe["llm_layers"])
    return {"cfg": cfg, "recipe": recipe, "out": out, "llm": llm, "train_json": train_json,
            "heldout_json": heldout_json, "data": data}


def _lane(jobs: List[tuple], job: Dict[str, Any], threads: int) -> Dict[str, Any]:
    """Train and evaluate ``[(name, vision, layer, features)]`` one after the other."""
    import torch
    torch.set_num_threads(threads)
    import qlip.vlm  # noqa: F401  (registers task "vlm" in a spawned process too)
    return {spec[0]: _variant(*spec, job) for spec in jobs}


def _demo_kind_accuracy(demo_dir: str) -> Optional[float]:
    """The demo QLIP's zero-shot kind accuracy on its held-out images (``DEMO_DIR/metrics.json``)."""
    path = os.path.join(demo_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return (json.load(f).get("qlip") or {}).get("kind_acc")


def checks(metrics: Dict[str, Any], kind_target: Optional[float]) -> Dict[str, Optional[bool]]:
    """The issue's targets: layer -2 answers colour >= 0.95, position >= 0.90, kind >= the demo
    QLIP's zero-shot kind accuracy (None when unknown), and Table 6's direction."""
    a = metrics["layer_-2"]
    return {"layer_-2 colour >= 0.95": a["colour"] >= 0.95,
            "layer_-2 position >= 0.90": a["position"] >= 0.90,
            "layer_-2 kind >= QLIP zero-shot kind": None if kind_target is None else a["kind"] >= kind_target,
            "layer_-2 >= after_quantizer": a["accuracy"] >= metrics["after_quantizer"]["accuracy"],
            "layer_-2 >= recon_only": a["accuracy"] >= metrics["recon_only"]["accuracy"]}


def run_vlm_demo(demo_dir: str = "runs/demo", out: str = "runs/demo-vlm", fast: bool = False,
                 threads: Optional[int] = None, qlip_path: Optional[str] = None,
                 recon_path: Optional[str] = None, lanes: Optional[int] = None) -> Dict[str, Any]:
    """``threads``: torch threads in all (default: torch's default, the cores); ``lanes``: 2 (the
    default with >= 2 threads) trains two variants at a time in two processes of ``threads // 2``
    threads (tiny models use threads badly: see qlip/demo/qlip.py), 1 trains them in turn."""
    import torch

    import qlip.vlm  # noqa: F401  (registers task "vlm")
    from ..io import load as qlip_load

    cfg = FAST if fast else FULL
    if lanes not in (None, 1, 2):
        raise ConfigError(f"lanes must be 1 or 2, got {lanes!r}")
    t_start = time.time()
    qlip_path = qlip_path or os.path.join(demo_dir, "qlip")
    recon_path = recon_path or os.path.join(demo_dir, "recon_only", "final")
    for what, path in (("QLIP", qlip_path), ("reconstruction-only", recon_path)):
        if not os.path.isdir(path):
            raise ConfigError(f"{what} model {path!r} not found: run `qlip demo` first (or pass --qlip / --recon-only)")
    size = qlip_load(qlip_path).image_size
    job = prepare(out, cfg, RECIPE, size)
    first = [("layer_-2", qlip_path, -2, "hidden"), ("last_layer", qlip_path, -1, "hidden")]
    second = [("after_quantizer", qlip_path, -2, "codes"), ("recon_only", recon_path, -2, "hidden")]
    cores = threads or torch.get_num_threads()
    lanes = 2 if (lanes is None and cores >= 2) else (lanes or 1)
    per_lane = max(1, cores // lanes)
    t_train = time.time()
    if lanes == 2:
        from .lanes import run_two_lanes
        print(f"[demo-vlm] two lanes of {per_lane} thread(s): layer_-2, last_layer | after_quantizer, recon_only",
              flush=True)
        try:
            res, theirs = run_two_lanes(lambda: _lane(first, job, per_lane), _lane, (second, job, per_lane),
                                        name="qlip-demo-vlm-lane2", what="the second VLM lane")
            res.update(theirs)
        finally:
            torch.set_num_threads(cores)
    else:
        res = _lane(first + second, job, cores)
    names = [spec[0] for spec in first + second]
    metrics: Dict[str, Any] = {n: res[n]["metrics"] for n in names}
    kind_target = _demo_kind_accuracy(demo_dir)
    metrics["checks"] = checks(metrics, kind_target)
    vlm_dir = os.path.join(out, "vlm")
    if os.path.isdir(vlm_dir):
        shutil.rmtree(vlm_dir)
    shutil.copytree(res["layer_-2"]["final"], vlm_dir)
    metrics["settings"] = {**cfg, **RECIPE, "fast": fast,
                           "qlip": qlip_path, "recon_only": recon_path, "image_size": size,
                           "qlip_zero_shot_kind_acc": kind_target, "lanes": lanes, "threads_per_lane": per_lane,
                           "seconds": {n: res[n]["seconds"] for n in names},
                           "final_loss": {n: res[n]["loss"] for n in names},
                           "training_wall_s": round(time.time() - t_train, 1),
                           "elapsed_s": round(time.time() - t_start, 1)}
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    _report(out, metrics, res["layer_-2"]["answers"][:12], job["data"])
    for k, v in metrics["checks"].items():
        print(f"[demo-vlm] {'met' if v else ('not measured' if v is None else 'NOT MET')}: {k}")
    print(f"[demo-vlm] {metrics['settings']['elapsed_s']:.0f} s; metrics in {out}/metrics.json, "
          f"report {out}/report.html, model {vlm_dir}", flush=True)
    return metrics


def _report(out: str, metrics: Dict[str, Any], examples: List[Dict[str, Any]], root: str) -> None:
    from PIL import Image
    rows = "".join(f"<tr><td>{n}</td>" + "".join(f"<td>{metrics[n][k]:.3f}</td>" for k in ("accuracy",) + TYPES)
                   + "</tr>" for n in VARIANTS)
    checks_html = "".join(f"<li>{html.escape(k)}: {'met' if v else ('not measured' if v is None else 'NOT met')}</li>"
                          for k, v in metrics["checks"].items())
    cells = []
    for e in examples:
        buf = io.BytesIO()
        Image.open(os.path.join(root, e["image"])).convert("RGB").resize((96, 96), Image.NEAREST).save(buf, "PNG")
        src = base64.b64encode(buf.getvalue()).decode()
        mark = "&#10003;" if e["correct"] else f"&#10007; (truth: {html.escape(e['truth'])})"
        cells.append(f"<div class='ex'><img src='data:image/png;base64,{src}'><br>{html.escape(e['question'])}"
                     f"<br><b>{html.escape(e['answer'])}</b> {mark}</div>")
    page = ("<!doctype html><meta charset='utf-8'><title>QLIP VLM demo</title><style>body{font-family:sans-serif}"
            "td,th{padding:4px 10px;text-align:right}.ex{display:inline-block;width:170px;margin:6px;"
            "vertical-align:top;font-size:13px}</style><h1>A LLaVA-style VLM on QLIP (Table 6 in miniature)</h1>"
            "<p>Exact-match answers on held-out shapes images, greedy decoding.</p><table><tr><th>vision features</th>"
            "<th>accuracy</th>" + "".join(f"<th>{t}</th>" for t in TYPES) + "</tr>" + rows + "</table>"
            "<ul>" + checks_html + "</ul>"
            "<h2>Examples (layer -2)</h2>" + "".join(cells)
            + f"<h2>Settings</h2><pre>{html.escape(json.dumps(metrics['settings'], indent=2))}</pre>")
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)
