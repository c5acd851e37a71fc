"""``qlip demo um3``: the paper's Table 5 in miniature, one model for text, captioning and drawing.

Reuses ``runs/demo`` (``qlip demo``): its QLIP (``runs/demo/qlip``) and its shapes data
(``runs/demo/data``). One tiny random Llama-3 (:func:`qlip.um3.tiny.make_tiny_llama`, no download)
with a small byte-level BPE trained on the demo's texts (:func:`qlip.um3.text.train_byte_bpe`:
one token per word; bytes alone were far too slow to learn in this budget), QK-norm and the
visual rows learns three tasks at once through the training engine (task ``um3``):

* text-only: a synthetic English corpus (:mod:`qlip.um3.corpus`, no shape or colour words);
* captioning: ``<bos> <boi> image <eoi> caption <eos>``, image = the QLIP ids of a shapes image;
* drawing: ``<bos> caption <boi> image <eoi>`` (10% of the captions dropped, for guidance).

The image-text pairs are the single-shape scenes of the demo's training shards (one kind word
in the caption; tokenized once by the demo QLIP, ``qlip.data.tokens.tokenize_shards``), so that
they look like the held-out test split the figures are measured on (single shapes).

Runs (same model size, steps and seed), two lanes of one thread each (as ``qlip demo``):

* ``um3``: Eq. 6 split softmax + Eq. 7 calm-down mixing (the paper's recipe);
* ``joint_softmax``: one softmax over all rows (ablation of Eq. 6);
* ``constant_mix``: the text share at ``r_T`` from the first step (ablation of Eq. 7);
* ``text_only``: every row text-only (the reference perplexity).

Figures (``OUT/metrics.json``), on data no run trained on:

* ``text_ppl``: token perplexity on the corpus' held-out tail (``data.val_fraction``), logits
  restricted to the text rows (what text generation samples from), for every model alike;
* ``caption_colour`` / ``caption_kind``: greedy captions of held-out test images (the demo's
  ``shapes-heldout`` split, labelled single shapes): the first colour / kind word is the label's;
* ``draw_colour`` / ``draw_kind`` / ``draw_adherence_top1``: drawings of "a {colour} {kind}" for
  the 32 classes (CFG, sampled), decoded by the QLIP and read by the independent non-learned
  shape judge (:mod:`qlip.eval.shape_judge`); top-1 = colour and kind both right (chance 1/32);
* ``draw_caption_gain`` / ``draw_colour_gain``: nats per image that the caption and its colour word
  are worth to the drawing's log-likelihood, on the first test images (:mod:`qlip.um3.scoring`; no
  sampling noise);
* ``ceiling``: the judge on the QLIP's reconstructions of the test images (what perfect drawing
  through this tokenizer would score: the demo tokenizer loses much of the kind).

``text_ppl_text_only_model`` is the ``text_only`` run's; ``ablations`` holds
``split_softmax`` / ``joint_softmax`` and ``calm_down`` / ``constant_mix`` with the same figures
(``split_softmax`` and ``calm_down`` are the ``um3`` run). ``OUT/report.html`` shows the table,
captions of test images and the drawings; ``OUT/um3`` is the ``um3`` model (a ``--model`` for
``qlip um3 generate``). Every training checkpoints; ``--resume`` reuses finished runs and
evaluations and resumes interrupted trainings.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import shutil
import time
from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError

# the model, the budget and the data (FAST: the seconds-long smoke run of the tests)
FULL = {"train_shards": 12, "test_images": 640, "draws_per_class": 8, "corpus_sentences": 40000, "vocab": 512,
        "dim": 64, "layers": 2, "heads": 4, "kv_heads": 2, "ffn": 256, "batch_size": 16, "caption_tokens": 24,
        "steps": 8000, "lr": 3e-3, "warmup": 20, "calm_down_steps": 70, "ckpt_every": 2000, "visual_init": "bits",
        "visual_bits": False, "precision": "fp32", "groups": 4, "cfg_scale": 5.0, "loss_average": "rows",
        "r0": 0.3, "rT": 0.05, "i2t_share": 0.25, "i2t_from": 0, "i2t_image_loss": False, "top_k": 200,
        "temperature": 1.0, "caption_cfg": 1.0, "layout": "token"}
# (docs/um3.md, "Issue 12, third round": rows average, text 0.3 -> 0.05, a quarter of the multimodal
# rows captions; "fifth round": one position per QLIP token, 8,000 steps, lr 3e-3, CFG 5; all chosen
# on the validation split)
FAST = {**FULL, "train_shards": 1, "test_images": 8, "draws_per_class": 1, "corpus_sentences": 300, "vocab": 300,
        "dim": 32, "layers": 1, "ffn": 64, "batch_size": 4, "caption_tokens": 12, "steps": 3, "lr": 3e-3,
        "warmup": 1, "calm_down_steps": 2, "ckpt_every": 2, "cfg_scale": 3.0, "r0": 0.6, "rT": 0.3, "i2t_share": 0.5}
FAST_CLASSES = 2                        # --fast draws only the first classes
CFG_DROPOUT = 0.1
SEED = 0
# name: (loss.softmax, data.mixing, text-only model)
RUNS: Dict[str, Tuple[str, str, bool]] = {"um3": ("split", "calm_down", False),
                                          "joint_softmax": ("joint", "calm_down", False),
                                          "constant_mix": ("split", "constant", False),
                                          "text_only": ("split", "constant", True)}
# with 2 x 14-bit sub-tokens the joint softmax scored every target over all ~33k rows (a step cost
# ~3.4 split-softmax steps); with the demo's 4 x 7 bits (~1k rows) the four runs cost about the same
LANES = (("um3", "constant_mix"), ("joint_softmax", "text_only"))
TEXT_PROMPTS = ("the old farmer", "some dogs", "a teacher reads")  # greedy continuations in the report
FIGURES = ("text_ppl", "caption_colour", "caption_kind", "draw_colour", "draw_kind", "draw_adherence_top1",
           "draw_caption_gain", "draw_colour_gain")
GAIN_IMAGES = 64                        # test images whose drawing rows are scored for the two gains


def add_arguments(p) -> None:
    p.add_argument("--demo-dir", default="runs/demo", help="the QLIP demo's output (default runs/demo)")
    p.add_argument("--out", default="runs/demo-um3", help="output folder (default runs/demo-um3)")
    p.add_argument("--fast", action="store_true", help="a seconds-long smoke run (a few steps, a few images)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs and resume interrupted ones")
    p.add_argument("--lanes", type=int, choices=(1, 2), default=None,
                   help="2: two processes of one thread each (default with >= 2 cores); 1: one after the other")


def run(args) -> int:
    run_um3_demo(args.demo_dir, args.out, fast=args.fast, resume=args.resume, lanes=args.lanes)
    return 0


# ---- data ----------------------------------------------------------------------------------------
def _demo_inputs(demo_dir: str) -> Tuple[str, str]:
    """(QLIP folder, shapes data folder) of a ``qlip demo`` output, or a one-line ConfigError."""
    qlip_dir = os.path.join(demo_dir, "qlip")
    if not os.path.isfile(os.path.join(qlip_dir, "config.json")):
        raise ConfigError(f"no QLIP model in {qlip_dir!r}: run `qlip demo` first (or pass --demo-dir)")
    fast = False
    marker = os.path.join(demo_dir, "demo-run.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            fast = bool(json.load(f).get("fast"))
    data = os.path.join(demo_dir, "data-fast" if fast else "data")
    if not os.path.isdir(data):
        raise ConfigError(f"no shapes data in {data!r}: run `qlip demo` first (or pass --demo-dir)")
    return qlip_dir, data


def _prepare(qlip_dir: str, data: str, out: str, cfg: Dict[str, Any], fast: bool, resume: bool,
             eval_split: str = "heldout") -> Dict[str, Any]:
    """Corpus, tiny Llama, token shards (single shapes) and the tokenized test images in ``OUT/data``
    (``eval_split``: the demo's held-out test split; benchmarks/um3_recipe.py chooses on ``val``)."""
    import glob

    import torch

    from ..data.evalsets import open_dataset
    from ..data.shapes import SINGLE_SHAPES, single_shape_caption
    from ..data.tokens import TokenShardDataset, filter_token_shards, tokenize_shards
    from ..eval.shape_judge import judge_accuracy
    from ..io import load
    from ..model.preprocess import denormalize
    from ..um3.corpus import synthetic_corpus
    from ..um3.text import train_byte_bpe
    from ..um3.tiny import make_tiny_llama
    d = os.path.join(out, "data")
    os.makedirs(d, exist_ok=True)
    corpus = os.path.join(d, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write(synthetic_corpus(cfg["corpus_sentences"], seed=SEED))
    shards = sorted(glob.glob(os.path.join(data, "shapes-train-*.tar")))[: cfg["train_shards"]]
    tests = sorted(glob.glob(os.path.join(data, f"shapes-{eval_split}-*.tar")))
    if not shards or not tests:
        raise ConfigError(f"{data!r} has no shapes-train-*.tar or shapes-{eval_split}-*.tar shards: run `qlip demo` first")
    model = load(qlip_dir).eval()
    all_tokens, tokens = os.path.join(d, "tokens-all"), os.path.join(d, "tokens")
    tokenize_shards(shards, model, all_tokens, model_name=qlip_dir, batch_size=128, preprocess="model",
                    overwrite=True, progress=False)
    n_single = filter_token_shards(all_tokens, tokens, single_shape_caption, SINGLE_SHAPES)
    pairs = TokenShardDataset(tokens)
    texts = synthetic_corpus(cfg["corpus_sentences"], seed=SEED).splitlines()
    texts = texts[: int(len(texts) * 0.9)]  # the BPE never sees the held-out tail of the corpus
    texts += [str(pairs.captions[i]) for i in range(len(pairs))]
    llama = make_tiny_llama(os.path.join(d, "tiny-llama"), dim=cfg["dim"], n_layers=cfg["layers"],
                            n_heads=cfg["heads"], n_kv_heads=cfg["kv_heads"], ffn_hidden=cfg["ffn"],
                            max_seq_len=1024, seed=SEED, tokenizer=train_byte_bpe(texts, cfg["vocab"]))
    test_file = os.path.join(d, "test.pt")
    test = torch.load(test_file, weights_only=True) if resume and os.path.isfile(test_file) else None
    source = [qlip_dir, data, cfg["test_images"]] + ([] if eval_split == "heldout" else [eval_split])
    if test is None or test.get("source") != source:
        ids, labels, recon, originals = [], [], [], []
        with torch.no_grad():
            for x, y in open_dataset(os.path.join(data, f"shapes-{eval_split}-*.tar")).batches(
                    model.preprocess, 64, limit=cfg["test_images"]):
                t = model.tokenize(x)
                ids.append(t)
                labels.append(y)
                originals.append(denormalize(x, model.image_mean, model.image_std).clamp(0, 1))
                recon.append(denormalize(model.detokenize(t), model.image_mean, model.image_std).clamp(0, 1))
        test = {"ids": torch.cat(ids), "labels": torch.cat(labels), "recon": torch.cat(recon),
                "originals": torch.cat(originals), "source": source}
        test["ceiling"] = judge_accuracy(test["recon"], test["labels"])
        torch.save(test, test_file)
    return {"corpus": corpus, "llama": llama, "tokens": tokens, "test": test_file, "grid": int(test["ids"].shape[-1]),
            "bits": model.num_bits, "train_pairs": n_single, "ceiling": test["ceiling"]}


# ---- one run -------------------------------------------------------------------------------------
def _recipe(name: str, prep: Dict[str, Any], cfg: Dict[str, Any]):
    from ..train import Recipe
    softmax, mixing, text_only = RUNS[name]
    from ..um3.vocab import UM3Vocab
    groups, layout = cfg.get("groups", 2), cfg.get("layout", "subtoken")
    per_token = UM3Vocab(text_size=1, bits=prep["bits"], groups=groups, layout=layout).per_token
    seq_len = prep["grid"] ** 2 * per_token + 4 + cfg["caption_tokens"]
    r0, rT = (1.0, 1.0) if text_only else (cfg["r0"], cfg["rT"])
    return Recipe.from_dict({
        "task": "um3",
        "model": {"init": prep["llama"], "qk_norm": True, "bits": prep["bits"], "groups": groups,
                  "visual_init": cfg["visual_init"], "visual_bits": cfg["visual_bits"], "layout": layout},
        "data": {"text": prep["corpus"], "tokens": prep["tokens"], "batch_size": cfg["batch_size"],
                 "seq_len": seq_len, "r0": r0, "rT": rT, "calm_down_steps": cfg["calm_down_steps"],
                 "mixing": mixing, "i2t_share": cfg["i2t_share"], "i2t_from": cfg["i2t_from"],
                 "i2t_image_loss": cfg["i2t_image_loss"], "cfg_dropout": CFG_DROPOUT, "val_fraction": 0.05,
                 "eval_batches": 4},
        "loss": {"softmax": softmax, "average": cfg["loss_average"]},
        "optim": {"optimizer": "adamw", "lr": cfg["lr"], "warmup_steps": cfg["warmup"], "steps": cfg["steps"],
                  "weight_decay": 0.0},
        "train": {"seed": cfg.get("seed", SEED), "precision": cfg.get("precision", "fp32"),
                  "log_every": max(1, cfg["steps"] // 20), "ckpt_every": cfg["ckpt_every"], "keep_ckpts": 1,
                  "progress": False, "tensorboard": False}})


def _train(name: str, recipe, run_dir: str, resume: bool) -> Dict[str, Any]:
    import qlip.um3.task  # noqa: F401  (registers the engine task "um3")
    from ..train import train
    from .resume import can_resume, finished_run, stale_run
    if stale_run(run_dir, recipe, resume, f"[demo-um3] {name}", ignore=("model.init", "data.text", "data.tokens")):
        resume = False
    s = finished_run(run_dir, recipe.optim.steps, resume)
    if s is not None:
        print(f"[demo-um3] {name}: finished earlier, reusing {s['final_model']}")
        return s
    again = can_resume(run_dir, resume)
    t0 = time.time()
    s = train(recipe, run_dir, resume=again)
    s["wall_s"] = round(time.time() - t0, 1)
    last = s.get("last_log", {})
    print(f"[demo-um3] {name}: {recipe.optim.steps} steps{' (resumed)' if again else ''} in {s['wall_s']:.0f} s, "
          + ", ".join(f"{k} {last[k]:.3f}" for k in ("ce", "ce_text", "ce_i2t", "ce_t2i") if k in last))
    return s


def held_out_text_ppl(model, text_ids, seq_len: int, batches: int = 4, batch_size: int = 16) -> float:
    """Perplexity on held-out text windows with the logits restricted to the text rows."""
    import math

    import torch

    from ..um3.mixing import text_windows
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(batches):
            t = text_windows(text_ids, batch_size, seq_len, i)
            nll = model.nll(t[:, :-1], t[:, 1:], "split")  # text targets: normalised over the text rows
            total, n = total + float(nll.sum()), n + nll.numel()
    return math.exp(total / max(n, 1))


def evaluate_run(name: str, final: str, recipe, prep: Dict[str, Any], qlip_dir: str, cfg: Dict[str, Any],
                 fast: bool) -> Dict[str, Any]:
    """The figures of one trained model (text only: ``text_ppl``), with the captions and drawings."""
    import torch

    from ..data.shapes import COLOR_NAMES, KINDS, caption_colour_kind
    from ..eval.shape_judge import judge_shapes
    from ..io import load
    from ..model.preprocess import denormalize
    from ..um3.generate import Sampling, caption, continue_text, draw
    from ..um3.mixing import tokenize_corpus
    from ..um3.model import load_um3
    from ..um3.scoring import caption_gains
    t0 = time.time()
    model, tok = load_um3(final)
    ids = tokenize_corpus(prep["corpus"], tok)
    held = ids[int(len(ids) * (1 - recipe.data.val_fraction)):]
    seq = min(recipe.data.seq_len, len(held) - 2)
    out: Dict[str, Any] = {"text_ppl": held_out_text_ppl(model, held, seq, batch_size=recipe.data.batch_size)}
    texts = {p: continue_text(model, tok, p, max_new=24, sampling=Sampling(temperature=0.0))[0] for p in TEXT_PROMPTS}
    if RUNS[name][2]:
        out["eval_s"] = round(time.time() - t0, 1)
        return {"figures": out, "continuations": texts}
    test = torch.load(prep["test"], weights_only=True)
    caps = []
    for i in range(0, len(test["ids"]), 64):
        caps += caption(model, tok, test["ids"][i:i + 64], max_new=cfg["caption_tokens"],
                        sampling=Sampling(temperature=0.0, cfg_scale=cfg["caption_cfg"]))
    truth = [(COLOR_NAMES[int(y) // len(KINDS)], KINDS[int(y) % len(KINDS)]) for y in test["labels"]]
    parsed = [caption_colour_kind(c) for c in caps]
    out["caption_colour"] = sum(p[0] == t[0] for p, t in zip(parsed, truth)) / len(caps)
    out["caption_kind"] = sum(p[1] == t[1] for p, t in zip(parsed, truth)) / len(caps)
    # what the caption and its colour word are worth to the drawing (nats per image; no sampling noise)
    n_gain = min(GAIN_IMAGES, len(truth))
    gains = caption_gains(model, tok, [f"a {c} {k}" for c, k in truth[:n_gain]], test["ids"][:n_gain], seed=SEED)
    out["draw_caption_gain"], out["draw_colour_gain"] = gains["caption_gain"], gains["colour_gain"]
    classes = [(c, k) for c in COLOR_NAMES for k in KINDS][: FAST_CLASSES if fast else None]
    prompts = [(c, k) for c, k in classes for _ in range(cfg["draws_per_class"])]
    q = load(qlip_dir).eval()
    # the demo draws with seed 0; benchmarks/um3_recipe.py chooses recipes on other samples (seed 1)
    # drawing: cfg["top_k"] over each sub-token's rows (200 > 128: no cut with 7-bit sub-tokens), cfg["temperature"]
    sampling = Sampling(temperature=cfg["temperature"], top_k=cfg["top_k"], cfg_scale=cfg["cfg_scale"],
                        seed=cfg.get("draw_seed", SEED))
    grid = (prep["grid"], prep["grid"])
    drawn = draw(model, tok, [f"a {c} {k}" for c, k in prompts], grid, sampling)  # batched per prompt length
    with torch.no_grad():
        images = denormalize(q.detokenize(drawn), q.image_mean, q.image_std).clamp(0, 1)
    judged = judge_shapes(images)
    n = len(prompts)
    out["draw_colour"] = sum(j["colour"] == c for j, (c, _) in zip(judged, prompts)) / n
    out["draw_kind"] = sum(j["kind"] == k for j, (_, k) in zip(judged, prompts)) / n
    out["draw_adherence_top1"] = sum(j["colour"] == c and j["kind"] == k for j, (c, k) in zip(judged, prompts)) / n
    out["eval_s"] = round(time.time() - t0, 1)
    return {"figures": out, "continuations": texts,
            "captions": [{"caption": c, "truth": f"{t[0]} {t[1]}"} for c, t in zip(caps, truth)],
            "drawings": {"prompts": [f"a {c} {k}" for c, k in prompts], "judged": judged},
            "images": images}


def _lane(names, prep: Dict[str, Any], qlip_dir: str, out: str, cfg: Dict[str, Any], fast: bool,
          resume: bool, threads: int = 1, reuse_eval: bool = True) -> Dict[str, Any]:
    """Train and evaluate ``names`` one after the other with ``threads`` torch threads; the results
    (figures, timings) also go to ``OUT/runs/<name>/eval.json``, the drawings to ``drawings.pt``.
    ``resume`` reuses finished trainings and (``reuse_eval``) their evaluations."""
    import torch
    torch.set_num_threads(threads)
    results = {}
    for name in names:
        run_dir = os.path.join(out, "runs", name)
        recipe = _recipe(name, prep, cfg)
        s = _train(name, recipe, run_dir, resume)
        ev_file = os.path.join(run_dir, "eval.json")
        if resume and reuse_eval and os.path.isfile(ev_file) and s.get("wall_s") is None:
            with open(ev_file, encoding="utf-8") as f:
                results[name] = json.load(f)
            print(f"[demo-um3] {name}: evaluated earlier, reusing {ev_file}")
            continue
        ev = evaluate_run(name, s["final_model"], recipe, prep, qlip_dir, cfg, fast)
        if "images" in ev:
            torch.save(ev.pop("images"), os.path.join(run_dir, "drawings.pt"))
        ev["train_s"] = s.get("wall_s")
        ev["final_model"] = s["final_model"]
        with open(ev_file, "w", encoding="utf-8") as f:
            json.dump(ev, f, indent=1)
        print(f"[demo-um3] {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev["figures"].items()))
        results[name] = ev
    return results


# ---- the demo ------------------------------------------------------------------------------------
def run_um3_demo(demo_dir: str = "runs/demo", out: str = "runs/demo-um3", fast: bool = False, resume: bool = False,
                 lanes: Optional[int] = None) -> Dict[str, Any]:
    import torch

    from .lanes import run_two_lanes
    cfg = FAST if fast else FULL
    qlip_dir, data = _demo_inputs(demo_dir)
    t_start = time.time()
    torch.set_num_threads(1)
    os.makedirs(out, exist_ok=True)
    prep = _prepare(qlip_dir, data, out, cfg, fast, resume)
    t_prep = time.time() - t_start
    print(f"[demo-um3] data: {prep['train_pairs']} single-shape image-caption pairs, {cfg['test_images']} test "
          f"images, {cfg['corpus_sentences']} sentences ({t_prep:.0f} s)")
    lanes = lanes or (2 if (os.cpu_count() or 1) >= 2 else 1)
    t_train = time.time()
    if lanes == 2:
        args = (prep, qlip_dir, out, cfg, fast, resume)
        results, theirs = run_two_lanes(lambda: _lane(LANES[0], *args), _lane, (LANES[1], *args),
                                        name="qlip-demo-um3-lane2", what="the second lane (" + ", ".join(LANES[1]) + ")",
                                        hint="; rerun with --resume to continue it", poll_s=2.0)
        results.update(theirs)
    else:
        results = _lane(LANES[0] + LANES[1], prep, qlip_dir, out, cfg, fast, resume)
    t_runs = time.time() - t_train
    main = results["um3"]["figures"]
    metrics: Dict[str, Any] = {k: main[k] for k in FIGURES}
    metrics["text_ppl_text_only_model"] = results["text_only"]["figures"]["text_ppl"]
    metrics["text_ppl_ratio"] = metrics["text_ppl"] / metrics["text_ppl_text_only_model"]
    figs = {n: {k: results[n]["figures"][k] for k in FIGURES} for n in ("um3", "joint_softmax", "constant_mix")}
    metrics["ablations"] = {"split_softmax": figs["um3"], "joint_softmax": figs["joint_softmax"],
                            "calm_down": figs["um3"], "constant_mix": figs["constant_mix"]}
    metrics["ceiling"] = prep["ceiling"]
    metrics["chance"] = {"colour": 1 / 8, "kind": 1 / 4, "top1": 1 / 32}
    metrics["timings_s"] = {"prepare": round(t_prep, 1), "runs_wall": round(t_runs, 1), "lanes": lanes,
                            **{f"train_{n}": results[n].get("train_s") for n in RUNS},
                            **{f"eval_{n}": results[n]["figures"].get("eval_s") for n in RUNS},
                            "total": round(time.time() - t_start, 1)}
    metrics["settings"] = {**cfg, "fast": fast, "qlip": qlip_dir, "data": data,
                           "cfg_dropout": CFG_DROPOUT,
                           "train_pairs": prep["train_pairs"], "grid": prep["grid"], "bits": prep["bits"]}
    metrics["settings"]["runs"] = {n: {"softmax": s, "mixing": m, "text_only": t} for n, (s, m, t) in RUNS.items()}
    keep = os.path.join(out, "um3")
    if os.path.isdir(keep):
        shutil.rmtree(keep)
    shutil.copytree(results["um3"]["final_model"], keep)
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    _report(out, metrics, results)
    print("[demo-um3] " + ", ".join(f"{k} {metrics[k]:.3f}" for k in FIGURES + ("text_ppl_text_only_model",))
          + f"; {metrics['timings_s']['total']:.0f} s; {os.path.join(out, 'report.html')}")
    return metrics


# ---- report --------------------------------------------------------------------------------------
def _png(image, scale: int = 2) -> str:
    from PIL import Image
    arr = (image.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    im = Image.fromarray(arr)
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _report(out: str, metrics: Dict[str, Any], results: Dict[str, Any]) -> None:
    import torch

    from ..data.shapes import caption_colour_kind
    test = torch.load(os.path.join(out, "data", "test.pt"), weights_only=True)
    rows = []
    for name in ("um3", "joint_softmax", "constant_mix", "text_only"):
        f = results[name]["figures"]
        rows.append(f"<tr><td>{name}</td>" + "".join(
            f"<td>{f[k]:.3f}</td>" if k in f else "<td>-</td>" for k in FIGURES) + "</tr>")
    caps = []
    for i, c in enumerate(results["um3"]["captions"][:24]):
        ok = caption_colour_kind(c["caption"]) == tuple(c["truth"].split())
        caps.append(f"<div class='ex'><img src='{_png(test['originals'][i])}'><br>"
                    f"<b>{html.escape(c['caption'])}</b> {'&#10003;' if ok else '&#10007;'}<br>"
                    f"<small>truth: {html.escape(c['truth'])}</small></div>")
    draws = []
    images = torch.load(os.path.join(out, "runs", "um3", "drawings.pt"), weights_only=True)
    d = results["um3"]["drawings"]
    for img, prompt, j in zip(images, d["prompts"], d["judged"]):
        seen = f"{j['colour']} {j['kind']}"
        draws.append(f"<div class='ex'><img src='{_png(img)}'><br>{html.escape(prompt)}<br>"
                     f"<small>judge: {html.escape(seen)}</small></div>")
    settings = {"timings_s": metrics["timings_s"], "settings": metrics["settings"]}
    page = ("<!doctype html><meta charset='utf-8'><title>QLIP UM3 demo</title><style>body{font-family:sans-serif}"
            "td,th{padding:4px 10px;text-align:right}.ex{display:inline-block;width:150px;margin:5px;"
            "vertical-align:top;font-size:12px}</style>"
            "<h1>UM3 on QLIP tokens: one tiny model for text, captioning and drawing (Table 5 in miniature)</h1>"
            "<p>Text perplexity on held-out synthetic sentences (tokens of the demo's BPE, text rows); captions of held-out test "
            "images (greedy; first colour / kind word); drawings of 'a {colour} {kind}' judged by the "
            "independent shape judge. Text-only model: perplexity "
            f"{metrics['text_ppl_text_only_model']:.3f}. Judge on the QLIP's own reconstructions of the test "
            f"images (the ceiling of drawing): colour {metrics['ceiling']['colour']:.3f}, kind "
            f"{metrics['ceiling']['kind']:.3f}, both {metrics['ceiling']['both']:.3f}.</p>"
            "<table><tr><th>run</th>" + "".join(f"<th>{k}</th>" for k in FIGURES) + "</tr>" + "".join(rows)
            + "</table><h2>Text continuations (greedy)</h2><table><tr><th>prompt</th><th>um3</th>"
            "<th>text_only</th></tr>"
            + "".join(f"<tr><td>{html.escape(p)}</td><td style='text-align:left'>"
                      f"{html.escape(results['um3']['continuations'][p])}</td><td style='text-align:left'>"
                      f"{html.escape(results['text_only']['continuations'][p])}</td></tr>" for p in TEXT_PROMPTS)
            + "</table><h2>Captions of held-out test images (um3)</h2>" + "".join(caps)
            + "<h2>Drawings (um3), decoded by the QLIP</h2>" + "".join(draws)
            + f"<h2>Settings and timings</h2><pre>{html.escape(json.dumps(settings, indent=2))}</pre>")
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(page)
