"""``qlip demo``: the tiny end-to-end QLIP run on generated shapes (the README's main job), and
``qlip demo t2i|vlm|um3``: the downstream demos, each a module ``qlip/demo/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int`` (registered when the module exists)."""
from __future__ import annotations

import importlib
import importlib.util

DOWNSTREAM = {"t2i": "text-to-image on QLIP tokens vs reconstruction-only tokens (paper Table 7 in miniature)",
              "vlm": "a LLaVA-style VLM on QLIP's encoder layers (paper Table 6 in miniature)",
              "um3": "one model for text, captioning and drawing (paper Table 5 in miniature)"}


def register(sub) -> None:
    d = sub.add_parser("demo", help="the tiny end-to-end QLIP run on generated shapes (README main job)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--fast", action="store_true", help="a much shorter smoke run (minutes -> seconds)")
    d.add_argument("--resume", action="store_true", help="reuse finished stages and resume interrupted ones")
    d.add_argument("--threads", type=int, default=None, help="torch threads in all (default: all cores)")
    d.add_argument("--lanes", type=int, choices=(1, 2), default=None,
                   help="2: train QLIP and the baselines in two processes at once (default with >= 2 cores); "
                        "1: one after the other")
    d.add_argument("--recipe", choices=("demo", "paper"), default="demo",
                   help="demo: the tuned demo recipe (default); paper: the paper's recipe at the same scale "
                        "(patchify stem, 4 encoder blocks, trained text tower, LAMB; stage 2 with GAN, without "
                        "the embedding-consistency term; docs/demo.md)")
    d.add_argument("--stage2-steps", type=int, default=None, metavar="N",
                   help="QLIP stage 2's steps (default: the recipe's 1,100). More steps give sharper "
                        "reconstructions (validation: judge kind 35%% at 1,100, 61%% at 6,000, ~0.23 s per step "
                        "on one core; docs/demo.md). With --resume on a finished demo only the new stage 2 "
                        "trains (its own folder) and everything is evaluated again")
    d.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=None,
                   help="the trainings' precision (default: the recipes' fp32, the same figures on every CPU); "
                        "bf16 autocast is 1.5-1.6x faster per step on a CPU with fast bf16 matmul "
                        "(benchmarks/cpu_bf16.py); auto: bf16 where qlip.nn.precision finds it fast")
    d.set_defaults(func=_demo)
    names = [n for n in DOWNSTREAM if importlib.util.find_spec(f"qlip.demo.{n}") is not None]
    if names:
        which = d.add_subparsers(dest="demo", metavar="{" + ",".join(names) + "}",
                                 help="a downstream demo (default: the QLIP demo)")
        for name in names:
            mod = importlib.import_module(f"qlip.demo.{name}")
            p = which.add_parser(name, help=DOWNSTREAM[name])
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)


def _demo(args) -> int:
    from .qlip import run_demo
    run_demo(args.out, fast=args.fast, resume=args.resume, threads=args.threads, lanes=args.lanes, recipe=args.recipe,
             stage2_steps=args.stage2_steps, precision=args.precision)
    return 0
