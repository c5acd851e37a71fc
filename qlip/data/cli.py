"""`qlip data ...` subcommands."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add ``qlip data shapes OUT --n N --size S --seed K [--heldout N] [--shard-size M]`` and
    ``qlip data tokenize SHARDS --model M --out DIR`` (see qlip/data/tokens.py)."""
    data = subparsers.add_parser("data", help="prepare datasets")
    sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    p = sub.add_parser("shapes", help="write the synthetic captioned-shapes dataset as webdataset shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", metavar="OUT", help="output directory")
    p.add_argument("--n", type=int, default=10000, help="number of training images")
    p.add_argument("--size", type=int, default=64, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--heldout", type=int, default=320, help="number of labelled held-out (test) images (32 classes)")
    p.add_argument("--val", type=int, default=320,
                   help="number of labelled validation images (choose recipes here, report the held-out test split)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard")
    p.add_argument("--overwrite", action="store_true", help="replace shapes data generated with other settings")
    p.add_argument("--group", type=int, default=1,
                   help="kind groups: consecutive images show the same scene with the shape kinds cycled (1-4)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering shards in parallel (same bytes)")
    p.add_argument("--style", choices=("plain", "wide"), default="plain",
                   help="training images' rendering: plain, or wide (other proportions, outlines, blur, noise, "
                        "backgrounds; docs/data.md 'Styles'); validation and test stay plain")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_shapes)

    from .tokens import add_arguments
    p = sub.add_parser("tokenize", help="tokenize image-text shards once into memory-mapped token shards",
                       description="qlip data tokenize SHARDS --model M --out DIR: run a QLIP over webdataset "
                                   "shards and write int32 id arrays + captions + index.json (docs/data.md, "
                                   "'Token shards'). Resumable; splits over RANK/WORLD_SIZE.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_tokenize)


def _shapes(args) -> int:
    from .shapes import generate_shapes

    m = generate_shapes(args.out, n=args.n, size=args.size, seed=args.seed, shard_size=args.shard_size,
                        heldout_n=args.heldout, overwrite=args.overwrite, progress=not args.quiet,
                        workers=args.workers, group=args.group, val_n=args.val, style=args.style)
    print(f"{args.out}: {m['n']} training images in {len(m['train_shards'])} shards, "
          f"{m['val_n']} validation and {m['heldout_n']} held-out test images in "
          f"{len(m['val_shards'])} + {len(m['heldout_shards'])} shards ({m['size']}px, seed {m['seed']})")
    return 0


def _tokenize(args) -> int:
    from .tokens import run_cli

    return run_cli(args)
