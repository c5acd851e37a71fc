"""``qlip train``, ``qlip balance`` and ``qlip demo``."""
from __future__ import annotations

import json


def register(sub) -> None:
    t = sub.add_parser("train", help="train QLIP from a YAML recipe (stage 1 or 2); torchrun for many GPUs")
    t.add_argument("recipe", help="YAML recipe, e.g. qlip/configs/demo-stage1.yaml")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.lr=1e-3 train.precision=bf16")
    t.add_argument("--out", required=True, help="run folder (checkpoints, logs, final model)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    t.set_defaults(func=_train)

    b = sub.add_parser("balance", help="paper's post-hoc loss weighting: short recon-only and align-only runs, "
                                       "then alpha_r/alpha_a = L_align(inf)/L_mse(inf)")
    b.add_argument("recipe")
    b.add_argument("overrides", nargs="*")
    b.add_argument("--out", required=True, help="folder for the two probe runs")
    b.add_argument("--steps", type=int, default=None, help="steps of each probe run (default: recipe's optim.steps)")
    b.add_argument("--tail", type=float, default=0.2, help="fraction of the final log used as L(inf) (default 0.2)")
    b.add_argument("-o", "--output", help="write the balanced recipe here (default: RECIPE with .balanced.yaml)")
    b.set_defaults(func=_balance)

    d = sub.add_parser("demo", help="the tiny end-to-end QLIP run on generated shapes (README main job)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--fast", action="store_true", help="a much shorter smoke run (minutes -> seconds)")
    d.add_argument("--resume", action="store_true", help="reuse finished stages and resume interrupted ones")
    d.add_argument("--threads", type=int, default=None, help="torch threads in all (default: all cores)")
    d.add_argument("--lanes", type=int, choices=(1, 2), default=None,
                   help="2: train QLIP and the baselines in two processes at once (default with >= 2 cores); "
                        "1: one after the other")
    d.set_defaults(func=_demo)


def _train(args) -> int:
    from .recipe import load_recipe
    from .trainer import train
    recipe = load_recipe(args.recipe, args.overrides)
    summary = train(recipe, args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "last_log"}))
    return 0


def _balance(args) -> int:
    from .balance import balance
    out = balance(args.recipe, args.overrides, args.out, steps=args.steps, tail=args.tail, output=args.output)
    print(json.dumps(out, indent=2))
    return 0


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(args.out, fast=args.fast, resume=args.resume, threads=args.threads, lanes=args.lanes)
    return 0
