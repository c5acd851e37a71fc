"""The ``qlip`` command line. Thin: parses arguments and calls the library.

User errors (unreadable images, bad id arrays, checkpoints that do not match) print one line,
``qlip: error: ...``, and exit with code 2; no traceback.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import List, Optional

from .errors import DataError, QLIPError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


# ---- helpers -------------------------------------------------------------------------------
def expand_images(items: List[str]) -> List[str]:
    """Files, folders (sorted, recursive) and globs -> image paths, in argument order."""
    paths: List[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(r, f) for r, _, fs in os.walk(item) for f in fs
                           if f.lower().endswith(IMAGE_EXTS))
            if not found:
                raise DataError(f"{item}: folder contains no images ({', '.join(IMAGE_EXTS)})")
            paths += found
        elif os.path.exists(item):
            paths.append(item)
        elif glob.has_magic(item):
            found = sorted(glob.glob(item, recursive=True))
            if not found:
                raise DataError(f"{item}: pattern matches no files")
            paths += found
        else:
            raise DataError(f"{item}: no such file or folder")
    return paths


def _device(name: Optional[str]):
    import torch
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(args):
    import torch
    from .io import load
    torch.manual_seed(args.seed)  # random-init presets are reproducible across commands
    model = load(args.model, pretrained=False if args.random_init else None, device=_device(args.device))
    return model.eval()


def _autocast(args):
    import contextlib
    import torch
    if getattr(args, "bf16", False):
        return torch.autocast(device_type=_device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(seq, n):
    for i in range(0, len(seq), n):
        yield seq[i: i + n]


def _progress(total, desc, quiet):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", disable=quiet or None, file=sys.stderr)


def _add_model_args(p, required=True):
    p.add_argument("--model", "-m", required=required,
                   help="preset name, local checkpoint folder (ours or official) or hub id (nvidia/QLIP-B-16-256)")
    p.add_argument("--random-init", action="store_true", help="use random weights for a preset (no download)")
    p.add_argument("--seed", type=int, default=0, help="seed of random-init weights (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _add_run_args(p, output_help):
    p.add_argument("-o", "--output", required=True, help=output_help)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast: faster on GPUs and AMX CPUs, slower on plain AVX-512 CPUs; "
                        "~99.4%% of id bits agree with fp32 (docs/performance.md)")
    p.add_argument("-q", "--quiet", action="store_true")


# ---- commands ------------------------------------------------------------------------------
def cmd_tokenize(args) -> int:
    import numpy as np
    import torch
    paths = expand_images(args.images)
    model = load_model(args)
    out = np.zeros((len(paths), model.grid, model.grid), dtype=np.int64)
    with _progress(len(paths), "tokenize", args.quiet) as bar, torch.inference_mode(), _autocast(args):
        for i, chunk in enumerate(_batches(paths, args.batch_size)):
            ids = model.tokenize(model.preprocess(chunk))
            out[i * args.batch_size: i * args.batch_size + len(chunk)] = ids.cpu().numpy()
            bar.update(len(chunk))
    _save_npy(args.output, out)
    if args.list:
        with open(args.list, "w", encoding="utf-8") as f:
            f.write("\n".join(paths) + "\n")
    print(f"wrote {args.output}: {out.shape[0]} images x {out.shape[1]}x{out.shape[2]} tokens of "
          f"{model.num_bits} bits (int64)")
    return 0


def _save_npy(path, arr):
    import numpy as np
    from .io import atomic_write
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), arr))


def load_ids(path: str, model):
    import numpy as np
    import torch
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from None
    if arr.dtype.kind not in "iu":
        raise DataError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (model.grid, model.grid):
        raise DataError(f"{path}: expected ids of shape (N, {model.grid}, {model.grid}) for this model, "
                        f"got {arr.shape}")
    if arr.dtype == np.uint64 and arr.size and arr.max() >= 2 ** 63:
        raise DataError(f"{path}: ids must lie in [0, 2**{model.num_bits}), found {int(arr.max())}")
    ids = torch.from_numpy(arr.astype(np.int64))
    model.check_ids(ids)
    return ids


def _write_pngs(model, images, folder, names):
    from .io import atomic_write
    os.makedirs(folder, exist_ok=True)
    for im, name in zip(model.postprocess(images), names):
        atomic_write(os.path.join(folder, name), lambda tmp, im=im: im.save(tmp, format="PNG"))


def cmd_detokenize(args) -> int:
    import torch
    model = load_model(args)
    ids = load_ids(args.ids, model)
    with _progress(len(ids), "detokenize", args.quiet) as bar, torch.inference_mode(), _autocast(args):
        for start in range(0, len(ids), args.batch_size):
            chunk = ids[start: start + args.batch_size]
            y = model.detokenize(chunk.to(model.device))
            _write_pngs(model, y, args.output, [f"{start + j:06d}.png" for j in range(len(chunk))])
            bar.update(len(chunk))
    print(f"wrote {len(ids)} PNG images to {args.output}")
    return 0


def cmd_reconstruct(args) -> int:
    import torch
    paths = expand_images(args.images)
    model = load_model(args)
    with _progress(len(paths), "reconstruct", args.quiet) as bar, torch.inference_mode(), _autocast(args):
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start: start + args.batch_size]
            y = model.reconstruct(model.preprocess(chunk))
            names = [f"{start + j:06d}_{os.path.splitext(os.path.basename(p))[0]}.png" for j, p in enumerate(chunk)]
            _write_pngs(model, y, args.output, names)
            bar.update(len(chunk))
    print(f"wrote {len(paths)} reconstructions to {args.output}")
    return 0


def cmd_zero_shot(args) -> int:
    import torch
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise QLIPError("--labels needs at least two comma-separated labels")
    paths = expand_images(args.images)
    model = load_model(args)
    prompts = [args.template.format(lbl) for lbl in labels]
    with torch.inference_mode():
        probs = model.zero_shot(model.preprocess(paths), prompts)
    for path, row in zip(paths, probs.tolist()):
        best = max(range(len(labels)), key=lambda i: row[i])
        print(f"{path}: {labels[best]} ({row[best]:.3f})")
        if args.verbose or len(paths) == 1:
            for lbl, pr in sorted(zip(labels, row), key=lambda t: -t[1]):
                print(f"  {pr:7.4f}  {lbl}")
    return 0


def cmd_info(args) -> int:
    import torch
    from .io import load
    torch.manual_seed(args.seed)
    model = load(args.model, pretrained=False if args.random_init else None)
    cfg = model.config
    n = model.num_params()
    info = {
        "model": args.model, "image_size": model.image_size, "patch_size": model.patch_size,
        "tokens_per_image": model.grid ** 2, "token_grid": [model.grid, model.grid], "bits_per_token": model.num_bits,
        "bits_per_image": model.num_bits * model.grid ** 2, "compression_ratio": round(model.compression_ratio(), 2),
        "group_size": cfg.quantizer.group_size, "has_text_tower": model.text is not None,
        "parameters": n, "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.model}")
    print(f"  image {model.image_size}x{model.image_size}, patch {model.patch_size} -> {model.grid}x{model.grid} "
          f"= {model.grid ** 2} tokens of {model.num_bits} bits ({info['bits_per_image']} bits/image)")
    print(f"  compression ratio 24*p^2/L = {info['compression_ratio']}")
    print("  parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in n.items()))
    v, d, t = cfg.vision, cfg.decoder, cfg.text
    print(f"  vision  {v.width}w x {v.depth} blocks, {v.heads} heads, mlp {v.mlp_dim}, swiglu={v.swiglu} "
          f"subln={v.subln} rope={v.rope}")
    print(f"  decoder {d.width}w x {d.depth} blocks, {d.heads} heads, mlp {d.mlp_dim}")
    print(f"  BSQ     L={cfg.quantizer.bits}, group {cfg.quantizer.group_size}, "
          f"inv_temperature {cfg.quantizer.inv_temperature}")
    print(f"  text    " + (f"{t.width}w x {t.depth} blocks, vocab {t.vocab_size}" if t else "none"))
    return 0


def cmd_convert(args) -> int:
    from .io import export_official
    model = load_model(args)
    if args.to == "official":
        export_official(model, args.output)
    else:
        model.save_pretrained(args.output)
    print(f"wrote {args.to} checkpoint to {args.output}")
    return 0


# ---- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlip", description="QLIP: text-aligned visual tokenizer (tokenize, "
                                "detokenize, zero-shot, train, evaluate).")
    from . import __version__
    p.add_argument("--version", action="version", version=f"qlip {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("tokenize", help="images -> int64 token ids (.npy, shape (N, H/p, W/p))")
    t.add_argument("images", nargs="+", help="image files, folders or globs")
    _add_model_args(t)
    _add_run_args(t, "output .npy file")
    t.add_argument("--list", help="also write the image paths (one per row of the array) to this text file")
    t.set_defaults(func=cmd_tokenize)

    d = sub.add_parser("detokenize", help="token ids (.npy) -> one PNG per row")
    d.add_argument("ids", help=".npy file of int ids, shape (N, H/p, W/p) or (H/p, W/p)")
    _add_model_args(d)
    _add_run_args(d, "output folder")
    d.set_defaults(func=cmd_detokenize)

    r = sub.add_parser("reconstruct", help="images -> tokens -> images (PNG)")
    r.add_argument("images", nargs="+")
    _add_model_args(r)
    _add_run_args(r, "output folder")
    r.set_defaults(func=cmd_reconstruct)

    z = sub.add_parser("zero-shot", help="classify images against text labels")
    z.add_argument("images", nargs="+")
    z.add_argument("--labels", required=True, help='comma-separated labels, e.g. "a dog,a cat"')
    z.add_argument("--template", default="{}", help='prompt template, e.g. "a photo of {}" (default: label as is)')
    _add_model_args(z)
    z.add_argument("-v", "--verbose", action="store_true", help="print every label's probability")
    z.set_defaults(func=cmd_zero_shot)

    i = sub.add_parser("info", help="config, parameter counts, bits and compression ratio of a model")
    i.add_argument("model")
    i.add_argument("--random-init", action="store_true")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="write a model in our format or the official NVIDIA format")
    _add_model_args(c)
    c.add_argument("--to", choices=["qlip", "official"], default="qlip")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=cmd_convert)

    for area in ("data", "train", "eval"):
        try:
            mod = __import__(f"qlip.{area}.cli", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("qlip"):
                continue  # area not built yet
            raise
        mod.register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except QLIPError as e:
        print(f"qlip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
