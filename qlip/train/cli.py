"""``qlip train`` and ``qlip balance`` (``qlip demo`` is registered by ``qlip.demo.cli``)."""
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
    b.add_argument("-o", "--output", help="write the balanced recipe here (default: OUT/RECIPE_NAME.balanced.yaml)")
    b.set_defaults(func=_balance)


def _train(args) -> int:
    from .recipe import load_recipe
    from .engine import train
    recipe = load_recipe(args.recipe, args.overrides)
    summary = train(recipe, args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "last_log"}))
    return 0


def _balance(args) -> int:
    from .balance import balance
    out = balance(args.recipe, args.overrides, args.out, steps=args.steps, tail=args.tail, output=args.output)
    print(json.dumps(out, indent=2))
    return 0

