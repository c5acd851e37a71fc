"""``qlip train`` (and its ``--dry-run``), ``qlip plan`` and ``qlip balance`` (``qlip demo`` is
registered by ``qlip.demo.cli``)."""
from __future__ import annotations

import json


def add_train_arguments(parser, recipe_help: str, overrides_example: str) -> None:
    """The arguments of every ``... train RECIPE [overrides] --out DIR [--resume]`` command."""
    parser.add_argument("recipe", help=recipe_help)
    parser.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {overrides_example}")
    parser.add_argument("--out", required=True, help="run folder (checkpoints, logs, final model)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")


def train_command(args, task=None, recipe=None) -> int:
    """Train ``args.recipe`` (or an already loaded ``recipe``) into ``args.out`` through the engine
    and print the summary. ``task``: the task this command trains (a recipe without ``task:``
    gets it; a recipe of another task is a one-line error)."""
    from ..errors import ConfigError
    from .engine import train
    from .recipe import load_recipe
    if recipe is None:
        recipe = load_recipe(args.recipe, args.overrides, default_task=task)
    if task is not None and recipe.task != task:
        raise ConfigError(f"{args.recipe}: task is {recipe.task!r}; this command trains task: {task}")
    summary = train(recipe, args.out, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "last_log"}))
    return 0


def register(sub) -> None:
    t = sub.add_parser("train", help="train a model from a YAML recipe (default task qlip: stage 1 or 2); "
                                     "torchrun for many GPUs")
    add_train_arguments(t, "YAML recipe, e.g. qlip/configs/demo-stage1.yaml", "optim.lr=1e-3 train.precision=bf16")
    t.add_argument("--dry-run", action="store_true", help="check the recipe, build the model (meta device), count "
                                                          "parameters, print the plan; train nothing")
    t.set_defaults(func=_train)

    p = sub.add_parser("plan", help="cost of a recipe: parameters, measured FLOPs and activation memory per sample, "
                                    "memory per device, step time and days at an assumed MFU (docs/scaling.md)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.batch_size=256")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu", default="h100", choices=["h200", "h100", "a100"], help="GPU type (default h100)")
    p.add_argument("--mfu", type=float, default=None, help="assumed model FLOPs utilisation (default 0.40)")
    p.add_argument("--batch", type=int, default=2, help="samples per measurement run on this CPU (default 2)")
    p.add_argument("--json", help="also write the plan as JSON to this file")
    p.add_argument("--measured", help="reuse the measurement of an earlier --json plan of the same model "
                                      "(batch, GPUs, checkpointing and chunking may differ; nothing is re-measured)")
    p.set_defaults(func=_plan)

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
    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from .dryrun import dry_run, format_dry_run
        print(format_dry_run(dry_run(recipe, args.out, args.recipe)))
        return 0
    return train_command(args, recipe=recipe)


def _plan(args) -> int:
    from .plan import DEFAULT_MFU, count_parameters, format_plan, load_measurement, make_plan, measure
    from .recipe import load_recipe
    recipe = load_recipe(args.recipe, args.overrides)
    m = load_measurement(args.measured, recipe) if args.measured else measure(recipe, batch=args.batch)
    plan = make_plan(recipe, m, count_parameters(recipe), gpu=args.gpu,
                     gpus=args.gpus, nodes=args.nodes, mfu=args.mfu if args.mfu is not None else DEFAULT_MFU,
                     name=args.recipe)
    print(format_plan(plan))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(plan.to_dict(), f, indent=2)
    return 0


def _balance(args) -> int:
    from .balance import balance
    out = balance(args.recipe, args.overrides, args.out, steps=args.steps, tail=args.tail, output=args.output)
    print(json.dumps(out, indent=2))
    return 0

