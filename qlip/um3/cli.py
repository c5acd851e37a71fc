"""``qlip um3 train | generate | tiny-llama`` (picked up by qlip/cli.py's DOWNSTREAM_AREAS)."""
from __future__ import annotations

import os

from ..train.cli import add_train_arguments, train_command


def register(sub) -> None:
    p = sub.add_parser("um3", help="UM3: one model for text, captioning and text-to-image on QLIP tokens (docs/um3.md)")
    us = p.add_subparsers(dest="um3_cmd", required=True)

    t = us.add_parser("train", help="train UM3 from a recipe (task: um3) through the training engine")
    add_train_arguments(t, "YAML recipe with task: um3", "loss.softmax=joint")
    t.set_defaults(func=_train)

    g = us.add_parser("generate", help="continue a text, caption an image or draw a caption with a saved UM3")
    g.add_argument("--model", required=True, help="a saved UM3 folder (a run's OUT/final)")
    what = g.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text to continue")
    what.add_argument("--image", help="image file to caption (needs --qlip)")
    what.add_argument("--draw", help="caption to draw (needs --qlip)")
    g.add_argument("-o", "--output", required=True,
                   help="output: a text file (--prompt, --image) or a PNG (--draw; -n > 1 adds _0, _1, ...)")
    g.add_argument("--qlip", help="the QLIP tokenizer the model was trained on (anything qlip.load takes)")
    g.add_argument("-n", type=int, default=1, help="samples")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=None,
                   help="default: 1.0 for --prompt and --draw, 0 (greedy) for --image")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (1 = off); default 5 for --draw (the demo's), 1 for --image "
                        "(a caption guided against the text-only model: docs/um3.md, fourth round), unused by --prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    g.set_defaults(func=_generate)

    m = us.add_parser("tiny-llama", help="save a tiny random Llama-3 (HF format) + byte-level tokenizer, offline")
    m.add_argument("--out", required=True)
    m.add_argument("--dim", type=int, default=64)
    m.add_argument("--layers", type=int, default=2)
    m.add_argument("--heads", type=int, default=4)
    m.add_argument("--kv-heads", type=int, default=2)
    m.add_argument("--ffn", type=int, default=128)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(func=_tiny)


def _train(args) -> int:
    return train_command(args, task="um3")


def _generate(args) -> int:
    import torch

    from ..errors import ConfigError
    from .generate import Sampling, caption, continue_text, draw
    from .model import load_um3
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = load_um3(args.model, device=device)
    temp = args.temperature if args.temperature is not None else (0.0 if args.image else 1.0)
    cfg = args.cfg if args.cfg is not None else (5.0 if args.draw else 1.0)
    s = Sampling(temperature=temp, top_k=args.top_k, top_p=args.top_p, cfg_scale=cfg, seed=args.seed)
    if args.prompt is not None:
        texts = continue_text(model, tok, args.prompt, args.max_new_tokens, s, n=args.n)
        return _write_texts(args.output, [args.prompt + t for t in texts])
    if not args.qlip:
        raise ConfigError("--image and --draw need --qlip: the QLIP model whose tokens the UM3 model was trained on")
    from ..io import load
    q = load(args.qlip, device=device).eval()
    if q.num_bits != model.vocab.bits:
        raise ConfigError(f"--qlip {args.qlip} has {q.num_bits}-bit tokens, the UM3 model {model.vocab.bits}-bit")
    if args.image:
        ids = q.tokenize(q.preprocess(args.image)).expand(args.n, -1, -1)
        return _write_texts(args.output, caption(model, tok, ids, args.max_new_tokens, s))
    ids = draw(model, tok, [args.draw] * args.n, (q.grid, q.grid), s)
    images = q.postprocess(q.detokenize(ids.to(device)))
    root, ext = os.path.splitext(args.output)
    paths = [args.output] if len(images) == 1 else [f"{root}_{i}{ext or '.png'}" for i in range(len(images))]
    for im, path in zip(images, paths):
        im.save(path)
        print(path)
    return 0


def _write_texts(path: str, texts) -> int:
    from ..io import atomic_write_text
    atomic_write_text(path, "\n".join(texts) + "\n")
    for t in texts:
        print(t)
    return 0


def _tiny(args) -> int:
    from .tiny import make_tiny_llama
    print(make_tiny_llama(args.out, dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                          ffn_hidden=args.ffn, seed=args.seed))
    return 0
