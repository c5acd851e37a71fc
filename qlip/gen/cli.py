"""``qlip gen train`` and ``qlip gen sample`` (registered by ``qlip/cli.py``; docs/gen.md)."""
from __future__ import annotations

import json
import os

from ..train.cli import add_train_arguments, train_command

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def register(sub) -> None:
    g = sub.add_parser("gen", help="text-to-image generation on QLIP tokens (LlamaGen-style): train, sample")
    gs = g.add_subparsers(dest="gen_command", metavar="{train,sample}")
    gs.required = True

    t = gs.add_parser("train", help="train a generator from a recipe (task t2i) through the training engine")
    add_train_arguments(t, "YAML recipe, or a preset name from qlip/gen/configs (e.g. t2i-demo)",
                        "data.train=DIR head.kind=bitwise")
    t.set_defaults(func=_train)

    s = gs.add_parser("sample", help="sample images for prompts: one PNG per image plus grid.png")
    s.add_argument("--model", required=True, help="generator folder (OUT/final of qlip gen train)")
    s.add_argument("--prompt", action="append", required=True, help="a caption (repeat for several)")
    s.add_argument("-n", type=int, default=8, help="images per prompt (default 8)")
    s.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale (1 = off; default 4)")
    s.add_argument("--cfg-interval", type=int, default=-1, help="guide only the first K image tokens (-1: all)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None, help="per sub-token / per bit (default: off)")
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    s.add_argument("-o", "--out", required=True, help="output folder")
    s.set_defaults(func=_sample)


def resolve_recipe(name: str) -> str:
    """A recipe path, or the name of a preset recipe in ``qlip/gen/configs``."""
    if os.path.isfile(name):
        return name
    for cand in (os.path.join(CONFIGS, name), os.path.join(CONFIGS, name + ".yaml")):
        if os.path.isfile(cand):
            return cand
    from ..errors import ConfigError
    raise ConfigError(f"{name}: no such recipe file (presets: "
                      f"{', '.join(sorted(n[:-5] for n in os.listdir(CONFIGS) if n.endswith('.yaml')))})")


def load_gen_recipe(path: str, overrides=()):
    """A recipe file or preset name whose task defaults to ``t2i``."""
    from ..train.recipe import load_recipe
    return load_recipe(resolve_recipe(path), overrides, default_task="t2i")


def _train(args) -> int:
    return train_command(args, task="t2i", recipe=load_gen_recipe(args.recipe, args.overrides))


def _sample(args) -> int:
    import torch

    from ..model.preprocess import tensor_to_pil
    from .generator import load
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = load(args.model, device=device)
    ids = gen.generate(args.prompt, n=args.n, cfg=args.cfg, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, cfg_interval=args.cfg_interval, batch_size=args.batch_size)
    images = gen.decode(ids).cpu()
    os.makedirs(args.out, exist_ok=True)
    files = []
    for i, im in enumerate(images):
        name = f"p{i // args.n:03d}-{i % args.n:03d}.png"
        tensor_to_pil(im).save(os.path.join(args.out, name))
        files.append(name)
    rows = len(args.prompt)
    grid = images.new_zeros(3, rows * images.shape[2], args.n * images.shape[3])
    for i, im in enumerate(images):
        r, c = divmod(i, args.n)
        grid[:, r * im.shape[1]:(r + 1) * im.shape[1], c * im.shape[2]:(c + 1) * im.shape[2]] = im
    tensor_to_pil(grid).save(os.path.join(args.out, "grid.png"))
    meta = {"prompts": args.prompt, "n": args.n, "cfg": args.cfg, "cfg_interval": args.cfg_interval,
            "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
            "files": files, "grid": "grid.png", "rows": "one per prompt"}
    with open(os.path.join(args.out, "samples.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps({"images": len(files), "out": args.out}))
    return 0
