"""``qlip demo vlm``: the paper's Table 6 in miniature, a LLaVA-style VLM on the demo's QLIP.

Reuses ``runs/demo`` (``qlip demo``): the QLIP model (``runs/demo/qlip``) and its
reconstruction-only baseline (``runs/demo/recon_only/final``). A tiny random Llama
(:mod:`qlip.vlm.tiny`, no download) learns shapes question answering
(:mod:`qlip.data.shapes_qa`) in LLaVA-1.5's two stages, once per vision feature:

* ``layer_-2``: QLIP's second-to-last encoder block (LLaVA's choice, the paper's);
* ``last_layer``: QLIP's last block, before the quantizer;
* ``after_quantizer``: QLIP's binary codes (the token bits);
* ``recon_only``: the reconstruction-only encoder's second-to-last block.

Outputs ``OUT/metrics.json`` (per variant ``accuracy`` and per question type ``colour``, ``kind``,
``position``, ``size``: exact-match fractions on held-out images, greedy answers),
``OUT/report.html`` (the table and example images with questions and answers) and ``OUT/vlm/``
(the ``layer_-2`` model, a ``--model`` for ``qlip vlm chat``).

Deviations from LLaVA-1.5, because the language model here is random, not pre-trained: stage 2
uses lr 3e-3 (LLaVA: 2e-5, which cannot teach a random LLM any words in a few hundred steps; at
1e-3 and 150 steps it had not even learnt which answers go with which question); stage 1 keeps
LLaVA's 1e-3. ``layer -2`` needs an encoder of at least two blocks: a demo QLIP of
one block (``vision.depth: 1``) is refused with a message (pass ``--qlip`` a deeper model).
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
FULL = {"train_images": 2000, "heldout_images": 100, "stage1_steps": 100, "stage2_steps": 300, "batch_size": 16}
FAST = {"train_images": 48, "heldout_images": 8, "stage1_steps": 3, "stage2_steps": 3, "batch_size": 4}
STAGE1_LR, STAGE2_LR = 1e-3, 3e-3


def add_arguments(p) -> None:
    p.add_argument("--demo-dir", default="runs/demo", help="the QLIP demo's output (default runs/demo)")
    p.add_argument("--out", default="runs/demo-vlm", help="output folder (default runs/demo-vlm)")
    p.add_argument("--qlip", default=None, help="QLIP model (default DEMO_DIR/qlip)")
    p.add_argument("--recon-only", default=None, help="reconstruction-only model (default DEMO_DIR/recon_only/final)")
    p.add_argument("--fast", action="store_true", help="a smoke run (a few steps, a few images)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")


def run(args) -> int:
    run_vlm_demo(args.demo_dir, args.out, fast=args.fast, threads=args.threads, qlip_path=args.qlip,
                 recon_path=args.recon_only)
    return 0


def _depth(path: str) -> int:
    from ..io import load
    return load(path).config.vision.depth


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
           out: str) -> str:
    from ..train import Recipe, train
    r = Recipe.from_dict({"task": "vlm", "model": model, "data": {"train": data, "batch_size": batch},
                          "optim": {"optimizer": "adamw", "lr": lr, "warmup_steps": max(1, steps // 20),
                                    "steps": steps, "weight_decay": 0.0},
                          "train": {"stage": stage, "log_every": max(1, steps // 10), "ckpt_every": 0,
                                    "progress": False, "tensorboard": False}})
    t0 = time.time()
    summary = train(r, out)
    print(f"[demo-vlm] {name} stage {stage}: {steps} steps in {time.time() - t0:.0f} s, "
          f"loss {summary['last_log'].get('loss', float('nan')):.3f}")
    return summary["final_model"]


def run_vlm_demo(demo_dir: str = "runs/demo", out: str = "runs/demo-vlm", fast: bool = False,
                 threads: Optional[int] = None, qlip_path: Optional[str] = None,
                 recon_path: Optional[str] = None) -> Dict[str, Any]:
    import torch

    import qlip.vlm  # noqa: F401  (registers task "vlm")
    from ..data.shapes_qa import write_shapes_qa
    from ..io import load as qlip_load
    from ..vlm import load
    from ..vlm.tiny import build_tiny_llm

    cfg = FAST if fast else FULL
    if threads:
        torch.set_num_threads(threads)
    t_start = time.time()
    qlip_path = qlip_path or os.path.join(demo_dir, "qlip")
    recon_path = recon_path or os.path.join(demo_dir, "recon_only", "final")
    for what, path in (("QLIP", qlip_path), ("reconstruction-only", recon_path)):
        if not os.path.isdir(path):
            raise ConfigError(f"{what} model {path!r} not found: run `qlip demo` first (or pass --qlip / --recon-only)")
        depth = _depth(path)
        if depth < 2:
            raise ConfigError(f"{what} model {path!r} has {depth} encoder block(s): the second-to-last layer "
                              f"(-2) needs at least 2 (train the demo with model.overrides.vision.depth >= 2)")
    size = qlip_load(qlip_path).image_size
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data")
    train_json = write_shapes_qa(data, cfg["train_images"], split="train", size=size, multi_turn=True)
    heldout_json = write_shapes_qa(data, cfg["heldout_images"], split="heldout", size=size,
                                   types=list(TYPES))
    texts = [t["value"] for r in json.load(open(train_json, encoding="utf-8")) for t in r["conversations"]]
    llm = build_tiny_llm(os.path.join(out, "tiny-llama"), texts, vocab_size=384, hidden_size=64, layers=2)
    variants = {"layer_-2": (qlip_path, -2, "hidden"), "last_layer": (qlip_path, -1, "hidden"),
                "after_quantizer": (qlip_path, -2, "codes"), "recon_only": (recon_path, -2, "hidden")}
    heldout = json.load(open(heldout_json, encoding="utf-8"))
    metrics: Dict[str, Any] = {}
    answers: Dict[str, list] = {}
    for name, (vision, layer, features) in variants.items():
        m = {"qlip": vision, "llm": llm, "layer": layer, "features": features, "max_length": 128}
        s1 = _train(name, 1, m, train_json, cfg["stage1_steps"], cfg["batch_size"], STAGE1_LR,
                    os.path.join(out, "runs", name, "stage1"))
        m2 = {"init": s1, "layer": layer, "features": features, "max_length": 128}
        s2 = _train(name, 2, m2, train_json, cfg["stage2_steps"], cfg["batch_size"], STAGE2_LR,
                    os.path.join(out, "runs", name, "stage2"))
        ev = evaluate(load(s2), heldout, data)
        metrics[name], answers[name] = ev["metrics"], ev["answers"]
        print(f"[demo-vlm] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev["metrics"].items()))
        if name == "layer_-2":
            if os.path.isdir(os.path.join(out, "vlm")):
                shutil.rmtree(os.path.join(out, "vlm"))
            shutil.copytree(s2, os.path.join(out, "vlm"))
    metrics["settings"] = {**cfg, "stage1_lr": STAGE1_LR, "stage2_lr": STAGE2_LR, "fast": fast,
                           "qlip": qlip_path, "recon_only": recon_path, "image_size": size,
                           "elapsed_s": round(time.time() - t_start, 1)}
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    _report(out, metrics, answers["layer_-2"][:12], data)
    return metrics


def _report(out: str, metrics: Dict[str, Any], examples: List[Dict[str, Any]], root: str) -> None:
    from PIL import Image
    rows = "".join(f"<tr><td>{n}</td>" + "".join(f"<td>{metrics[n][k]:.3f}</td>" for k in ("accuracy",) + TYPES)
                   + "</tr>" for n in metrics if n != "settings")
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
            "<h2>Examples (layer -2)</h2>" + "".join(cells)
            + f"<h2>Settings</h2><pre>{html.escape(json.dumps(metrics['settings'], indent=2))}</pre>")
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)
