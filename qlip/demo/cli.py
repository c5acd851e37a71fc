"""``qlip demo``: the tiny end-to-end QLIP run on generated shapes (the README's main job)."""
from __future__ import annotations


def register(sub) -> None:
    d = sub.add_parser("demo", help="the tiny end-to-end QLIP run on generated shapes (README main job)")
    d.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    d.add_argument("--fast", action="store_true", help="a much shorter smoke run (minutes -> seconds)")
    d.add_argument("--resume", action="store_true", help="reuse finished stages and resume interrupted ones")
    d.add_argument("--threads", type=int, default=None, help="torch threads in all (default: all cores)")
    d.add_argument("--lanes", type=int, choices=(1, 2), default=None,
                   help="2: train QLIP and the baselines in two processes at once (default with >= 2 cores); "
                        "1: one after the other")
    d.set_defaults(func=_demo)


def _demo(args) -> int:
    from .qlip import run_demo
    run_demo(args.out, fast=args.fast, resume=args.resume, threads=args.threads, lanes=args.lanes)
    return 0
