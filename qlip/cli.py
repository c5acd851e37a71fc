"""The ``qlip`` command line. Thin: parses arguments and calls the library.

User errors (unreadable images, bad id arrays, checkpoints that do not match) print one line,
``qlip: error: ...``, and exit with code 2; no traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from typing import List, Optional

from .data.images import expand_images
from .errors import DataError, QLIPError

DOWNSTREAM_AREAS = ("gen", "vlm", "um3")  # qlip/<area>/cli.py register(sub), when the package exists


# ---- helpers -------------------------------------------------------------------------------
def _device(name: Optional[str]):
    import torch
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(args):
    """The model of ``--model`` on ``--device``, in ``--precision`` where the command has it (the
    choice of ``auto`` or bf16 is said on stderr unless ``--quiet``)."""
    import torch
    from .io import load
    torch.manual_seed(args.seed)  # random-init presets are reproducible across commands
    precision = getattr(args, "precision", None)
    if precision not in (None, "fp32") and getattr(args, "bf16", False):
        raise QLIPError("--bf16 (autocast) and --precision cannot be combined; use --precision bf16")
    model = load(args.model, pretrained=False if args.random_init else None, device=_device(args.device),
                 precision=precision)
    if model.precision_choice is not None and precision != "fp32" and not getattr(args, "quiet", False):
        print(f"qlip: precision {model.precision_choice}", file=sys.stderr)
    return model.eval()


def _autocast(args):
    import contextlib
    import torch
    if getattr(args, "bf16", False):
        return torch.autocast(device_type=_device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _plural(n: int, word: str) -> str:
    """``1 PNG image``, ``2 PNG images``."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def _check_output_file(path: str, what: str) -> None:
    """Fail before any work when ``-o`` names a folder instead of a file."""
    if os.path.isdir(path):
        raise QLIPError(f"{path}: is a folder; {what} names the file to write (e.g. {os.path.join(path, 'ids.npy')})")


def _check_output_folder(path: str) -> None:
    """Fail before any work when ``-o`` names an existing file instead of a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise QLIPError(f"{path}: exists and is not a folder; -o names the folder to write the PNGs into")


def _image_batches(paths, model, args):
    """Normalised batches of ``paths`` (exactly ``model.preprocess``), decoded by ``--workers``
    processes while the model runs on the previous batch."""
    from .data.decode import image_batches
    return image_batches(paths, model.config.preprocess, args.batch_size, workers=args.workers,
                         pin_memory=model.device.type == "cuda")


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
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32 (default: the same ids on every machine); bf16: weights cast to bfloat16 once, "
                        "the pre-sign projection kept in fp32 (>= 99%% of id bits agree with fp32); auto: bf16 "
                        "on a CUDA GPU or an AMX CPU, else fp32 (docs/performance.md)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast over fp32 weights (re-cast at every call; --precision bf16 is "
                        "faster): faster on GPUs and AMX CPUs, slower on plain AVX-512 CPUs")
    p.add_argument("-q", "--quiet", action="store_true")


def _add_workers_arg(p):
    p.add_argument("--workers", type=int, default=2,
                   help="processes decoding images while the model runs (0: in the main process; default 2)")


# ---- commands ------------------------------------------------------------------------------
def cmd_tokenize(args) -> int:
    import numpy as np
    import torch
    _check_output_file(args.output, "-o")
    if args.list:
        _check_output_file(args.list, "--list")
    paths = expand_images(args.images)
    model = load_model(args)
    out = np.zeros((len(paths), model.grid, model.grid), dtype=np.int64)
    start = 0
    with _progress(len(paths), "tokenize", args.quiet) as bar, torch.inference_mode(), _autocast(args):
        for x in _image_batches(paths, model, args):
            ids = model.tokenize(x.to(model.device, non_blocking=True))
            out[start: start + len(ids)] = ids.cpu().numpy()
            start += len(ids)
            bar.update(len(ids))
    _save_npy(args.output, out)
    if args.list:
        from .io import atomic_write_text
        atomic_write_text(args.list, "\n".join(paths) + "\n")
    print(f"wrote {args.output}: {_plural(out.shape[0], 'image')} x {out.shape[1]}x{out.shape[2]} tokens of "
          f"{model.num_bits} bits (int64)")
    return 0


def _save_npy(path, arr):
    import numpy as np
    from .io import atomic_write
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.save(path) would append ".npy" to the name
            np.save(f, arr)
    atomic_write(path, write)


def load_ids(path: str, model, notes: Optional[List[str]] = None):
    """Read an .npy id array for ``model`` as an int64 (N, grid, grid) tensor.

    Integer arrays of any width are accepted and a (grid, grid) array is one image; each such
    conversion is described in ``notes`` (when given) so that the caller can say how the file was read.
    """
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
    if arr.size == 0:
        raise DataError(f"{path}: the id array is empty (shape {arr.shape}); nothing to decode")
    read_as = []
    if arr.ndim == 2:
        arr = arr[None]
        read_as.append(f"shape {arr.shape[1:]} as one image")
    if arr.ndim != 3 or arr.shape[1:] != (model.grid, model.grid):
        raise DataError(f"{path}: expected ids of shape (N, {model.grid}, {model.grid}) for this model, "
                        f"got {arr.shape}")
    if arr.dtype == np.uint64 and arr.max() >= 2 ** 63:
        raise DataError(f"{path}: ids must lie in [0, 2**{model.num_bits}), found {int(arr.max())}")
    if arr.dtype != np.int64:
        read_as.append(f"{arr.dtype} ids as int64")
    if read_as and notes is not None:
        notes.append(f"{path}: read " + " and ".join(read_as))
    ids = torch.from_numpy(arr.astype(np.int64))
    try:
        model.check_ids(ids)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    return ids


def _write_pngs(model, images, folder, names):
    from .io import atomic_write
    os.makedirs(folder, exist_ok=True)
    for im, name in zip(model.postprocess(images), names):
        atomic_write(os.path.join(folder, name), lambda tmp, im=im: im.save(tmp, format="PNG"))


def cmd_detokenize(args) -> int:
    import torch
    _check_output_folder(args.output)
    model = load_model(args)
    notes: List[str] = []
    ids = load_ids(args.ids, model, notes)
    for note in notes:
        print(f"qlip: {note}", file=sys.stderr)
    with _progress(len(ids), "detokenize", args.quiet) as bar, torch.inference_mode(), _autocast(args):
        for start in range(0, len(ids), args.batch_size):
            chunk = ids[start: start + args.batch_size]
            y = model.detokenize(chunk.to(model.device))
            _write_pngs(model, y, args.output, [f"{start + j:06d}.png" for j in range(len(chunk))])
            bar.update(len(chunk))
    print(f"wrote {_plural(len(ids), 'PNG image')} to {args.output}")
    return 0


def cmd_reconstruct(args) -> int:
    import torch
    _check_output_folder(args.output)
    paths = expand_images(args.images)
    model = load_model(args)
    with _progress(len(paths), "reconstruct", args.quiet) as bar, torch.inference_mode(), _autocast(args):
        for start, x in zip(range(0, len(paths), args.batch_size), _image_batches(paths, model, args)):
            chunk = paths[start: start + args.batch_size]
            y = model.reconstruct(x.to(model.device, non_blocking=True))
            names = [f"{start + j:06d}_{os.path.splitext(os.path.basename(p))[0]}.png" for j, p in enumerate(chunk)]
            _write_pngs(model, y, args.output, names)
            bar.update(len(chunk))
    print(f"wrote {_plural(len(paths), 'reconstruction')} to {args.output}")
    return 0


def cmd_zero_shot(args) -> int:
    import torch
    from .eval.zeroshot import check_template, format_prompt
    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise QLIPError("--labels needs at least two comma-separated labels")
    template = check_template(args.template)
    paths = expand_images(args.images)
    model = load_model(args)
    prompts = [format_prompt(template, lbl) for lbl in labels]
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
    print("  text    " + (f"{t.width}w x {t.depth} blocks, vocab {t.vocab_size}" if t else "none"))
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
class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose leaf commands accept options between and after positional lists.

    Plain argparse stops filling a ``nargs="*"``/``"+"`` positional at the first option, so
    ``qlip train RECIPE --out DIR optim.steps=2000`` would leave ``optim.steps=2000`` unrecognised.
    Leaf parsers (those without subcommands) therefore parse "intermixed": options first, then
    every remaining word fills the positionals in order. Parsers with subcommands cannot parse
    that way (argparse refuses), so they keep the plain behaviour; ``add_subparsers`` creates
    every sub-parser with this class, so registered areas get it too.
    """

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._subparsers is not None or self._intermixing or not self._get_positional_actions():
            return super().parse_known_args(args, namespace)
        self._intermixing = True  # parse_known_intermixed_args calls parse_known_args itself (Python < 3.13)
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="qlip", description="QLIP: text-aligned visual tokenizer (tokenize, "
                                "detokenize, zero-shot, train, evaluate).")
    from . import __version__
    p.add_argument("--version", action="version", version=f"qlip {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("tokenize", help="images -> int64 token ids (.npy, shape (N, H/p, W/p))")
    t.add_argument("images", nargs="+", help="image files, folders or globs")
    _add_model_args(t)
    _add_run_args(t, "output .npy file")
    t.add_argument("--list", help="also write the image paths (one per row of the array) to this text file")
    _add_workers_arg(t)
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
    _add_workers_arg(r)
    r.set_defaults(func=cmd_reconstruct)

    z = sub.add_parser("zero-shot", help="classify images against text labels")
    z.add_argument("images", nargs="+")
    z.add_argument("--labels", required=True, help='comma-separated labels, e.g. "a dog,a cat"')
    z.add_argument("--template", default="{}", help='prompt template with {} or {c} for the label, e.g. '
                   '"a photo of {}" (default: label as is)')
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

    # Each area adds its own commands. Imported eagerly and plainly: a broken import of our own code
    # fails loudly here instead of silently removing commands; the area modules import optional
    # third-party packages only inside their handlers, so a missing extra fails that command alone.
    # The downstream areas (gen, vlm, um3) register when their package is present; present and
    # broken still fails loudly.
    from .data import cli as data_cli
    from .demo import cli as demo_cli
    from .eval import cli as eval_cli
    from .train import cli as train_cli
    areas = [data_cli, train_cli, eval_cli]
    for name in DOWNSTREAM_AREAS:
        if importlib.util.find_spec(f"qlip.{name}") is not None:
            areas.append(importlib.import_module(f"qlip.{name}.cli"))
    for area in areas + [demo_cli]:
        area.register(sub)
    return p


def _cli_message(e: QLIPError, args) -> str:
    """The error line; a hub download failure names the command-line way to pass a local folder."""
    from .io.checkpoint import HubUnavailableError
    if isinstance(e, HubUnavailableError):
        hint = "it to `qlip info DIR`" if args.command == "info" else (
            "--model DIR" if hasattr(args, "model") else e.folder_hint)
        e = e.with_folder_hint(hint)
    return str(e)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except QLIPError as e:
        print(f"qlip: error: {_cli_message(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qlip: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``qlip`` command (console script and ``python -m qlip``): :func:`main`, then the exit
    that a distributed run needs (``qlip.train.distributed.exit_process``)."""
    code = main()
    dist_mod = sys.modules.get("qlip.train.distributed")  # not imported: no process group either
    if dist_mod is None:
        sys.exit(code)
    dist_mod.exit_process(code)


if __name__ == "__main__":
    run()
