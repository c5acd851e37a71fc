"""The shape-kind experiments behind docs/demo.md ("Second round"), rerunnable.

    # supervised probe: vision tower + linear 32-way (colour x kind) head, cross-entropy
    python benchmarks/demo_kind.py probe --tower vit --stem conv --lr 3e-4 --steps 600
    python benchmarks/demo_kind.py probe --tower timm --lr 1e-3 --steps 300
    python benchmarks/demo_kind.py probe --tower cnn --lr 1e-3 --steps 1500
    python benchmarks/demo_kind.py probe --stem conv --set vision.depth=2

    # single-shape training shards for contrastive runs (full grammar or colour + kind captions)
    python benchmarks/demo_kind.py single data/single --n 6000
    python benchmarks/demo_kind.py single data/short --n 6000 --short

    # a contrastive run (CLIP-only) is a plain recipe with overrides, e.g.
    qlip train qlip/configs/demo-stage1.yaml --out runs/k1 data.train='data/short/shapes-train-*.tar' \
        loss.alpha_r=0 loss.alpha_q=0 loss.alpha_z=0 model.overrides.vision.stem=conv \
        optim.optimizer=adamw optim.lr=3e-4 optim.lr_visual=3e-4 optim.lr_text=3e-4 optim.lr_generator=3e-4

    # zero-shot / colour / kind accuracy of every checkpoint of a run, and the text-side diagnostic
    python benchmarks/demo_kind.py eval runs/k1 --heldout 'runs/demo/data/shapes-heldout-*.tar'
    python benchmarks/demo_kind.py captions runs/k1/final --heldout 'runs/demo/data/shapes-heldout-*.tar'

The held-out split defaults to a freshly generated one (640 images, seed 0: the demo's).
Accuracies are fractions of the held-out images; chance is 1/8 for colour and 1/4 for kind.
"""
from __future__ import annotations

import argparse
import glob
import io
import os
import random
import sys
import time

# keep benchmarks/ off sys.path (its scripts are not modules of this program)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import qlip  # noqa: E402
from qlip.data.evalsets import ShardDataset  # noqa: E402
from qlip.data.shapes import KINDS, SHAPE_CLASSNAMES, generate_heldout, write_tar  # noqa: E402


def _heldout(spec: str | None, cache: str) -> str:
    if spec:
        return spec
    out = os.path.join(cache, "heldout")
    if not glob.glob(os.path.join(out, "*.tar")):
        generate_heldout(out, n=640, seed=0)
    return os.path.join(out, "shapes-heldout-*.tar")


def _load(spec: str, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for x, y in ShardDataset(spec).batches(preprocess, batch_size=500):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


class _CNN(nn.Module):
    """Reference: four 3x3 stride-2 convolutions with GELU, global mean pooling."""

    def __init__(self, width: int = 128):
        super().__init__()
        chans = [3, 32, 64, width, width]
        layers = []
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, 2, 1), nn.GELU()]
        self.net = nn.Sequential(*layers)
        self.width = width

    def forward(self, x):
        return self.net(x).mean((2, 3))


def _tower(kind: str, stem: str, overrides: dict | None = None) -> tuple[nn.Module, int]:
    cfg = qlip.get_preset("qlip-demo", **{"vision.stem": stem, **(overrides or {})})
    if kind == "cnn":
        return _CNN(cfg.vision.width), cfg.vision.width
    if kind == "timm":
        import timm
        m = timm.create_model("vit_tiny_patch16_224", img_size=cfg.vision.image_size, patch_size=cfg.vision.patch_size,
                              embed_dim=cfg.vision.width, depth=cfg.vision.depth, num_heads=cfg.vision.heads,
                              num_classes=0, global_pool="token")
        return m, cfg.vision.width
    visual = qlip.QLIP(cfg).visual

    class _ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = visual

        def forward(self, x):
            return self.visual.ln_post(self.visual(x)[:, 0])
    return _ViT(), cfg.vision.width


def cmd_probe(a) -> None:
    torch.manual_seed(a.seed)
    pre = qlip.QLIP(qlip.get_preset("qlip-demo")).preprocess
    train = os.path.join(a.cache, f"probe-train-{a.n}")
    if not glob.glob(os.path.join(train, "*.tar")):
        generate_heldout(train, n=a.n, seed=7)  # labelled single shapes, another seed than the held-out split
    xtr, ytr = _load(os.path.join(train, "shapes-heldout-*.tar"), pre)
    xte, yte = _load(_heldout(a.heldout, a.cache), pre)
    import ast
    overrides = {}
    for item in a.set:
        key, _, val = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            overrides[key] = val
    tower, width = _tower(a.tower, a.stem, overrides)
    head = nn.Linear(width, len(SHAPE_CLASSNAMES))
    opt = torch.optim.AdamW(list(tower.parameters()) + list(head.parameters()), lr=a.lr, weight_decay=0.05)
    print(f"probe: tower={a.tower} stem={a.stem} {overrides or ''} lr={a.lr} batch={a.batch} "
          f"train={len(xtr)} test={len(xte)}")
    t0 = time.time()
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(xtr), (a.batch,))
        loss = F.cross_entropy(head(tower(xtr[idx])), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.every == 0 or step == a.steps:
            with torch.no_grad():
                pred = torch.cat([head(tower(xte[i:i + 256])).argmax(1) for i in range(0, len(xte), 256)])
            k = len(KINDS)
            print(f"step {step:5d}  loss {loss.item():.3f}  colour {(pred // k == yte // k).float().mean():.3f}  "
                  f"kind {(pred % k == yte % k).float().mean():.3f}  ({time.time() - t0:.0f} s)", flush=True)


def cmd_single(a) -> None:
    """Single-shape training shards (the held-out generator, another seed), renamed shapes-train-*;
    ``--short`` rewrites the captions to colour + kind only."""
    tmp = a.out + ".tmp"
    generate_heldout(tmp, n=a.n, seed=a.seed, shard_size=1000)
    os.makedirs(a.out, exist_ok=True)
    rng = random.Random(a.seed)
    frames = ["a {}", "a photo of a {}", "there is a {}", "an image of a {}"]
    for i, src in enumerate(sorted(glob.glob(os.path.join(tmp, "*.tar")))):
        def samples():
            for key, fields in ShardDataset(src)._groups():
                if a.short:
                    label = int(fields["cls"])
                    fields["txt"] = rng.choice(frames).format(SHAPE_CLASSNAMES[label]).encode()
                yield key, fields
        write_tar(os.path.join(a.out, f"shapes-train-{i:06d}.tar"), samples())
        os.remove(src)
    for f in os.listdir(tmp):
        os.remove(os.path.join(tmp, f))
    os.rmdir(tmp)
    print(f"{a.out}: {a.n} single-shape images ({'colour + kind' if a.short else 'full grammar'} captions)")


def cmd_eval(a) -> None:
    from qlip.demo.qlip import evaluate
    heldout = _heldout(a.heldout, a.cache)
    ck = os.path.join(a.run, "checkpoints")
    paths = [os.path.join(ck, n) for n in sorted(os.listdir(ck))] if os.path.isdir(ck) else []
    paths += [os.path.join(a.run, "final")]
    for p in paths:
        if not os.path.isdir(p):
            continue
        ev = evaluate(qlip.load(p), heldout)
        print(os.path.relpath(p, a.run), {k: round(v, 3) for k, v in ev.items() if isinstance(v, float)}, flush=True)


@torch.no_grad()
def cmd_captions(a) -> None:
    """Kind accuracy among the four kind-swapped versions of each held-out caption (training-style
    wording), and the text cosine between short prompts that differ only in the kind."""
    m = qlip.load(a.model).eval()
    ds = ShardDataset(_heldout(a.heldout, a.cache))
    correct = total = 0
    for key, group in ds._groups():
        if total >= a.limit:
            break
        from PIL import Image
        img = Image.open(io.BytesIO(group["png"])).convert("RGB")
        caption, label = group["txt"].decode(), int(group["cls"])
        kind = KINDS[label % len(KINDS)]
        variants = [caption.replace(kind, k) for k in KINDS]
        fi = m.encode_image(m.preprocess([img]), normalize=True)
        ft = m.encode_text(m.tokenizer(variants), normalize=True)
        correct += int((fi @ ft.T).argmax().item() == label % len(KINDS))
        total += 1
    print(f"kind among kind-swapped captions: {correct / total:.3f} ({total} images, chance 0.25)")
    prompts = [f"a red {k}" for k in KINDS]
    t = m.encode_text(m.tokenizer(prompts), normalize=True)
    cos = t @ t.T
    for i, p in enumerate(prompts):
        print(f"{p:16s}", " ".join(f"{c:.3f}" for c in cos[i].tolist()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", default="runs/demo_kind", help="folder for generated data")
    ap.add_argument("--threads", type=int, default=None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="supervised colour x kind probe of a vision tower")
    p.add_argument("--tower", choices=["vit", "timm", "cnn"], default="vit")
    p.add_argument("--stem", choices=["patch", "conv"], default="patch")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--n", type=int, default=6000, help="labelled single-shape training images")
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="qlip-demo preset override for the vit tower, e.g. vision.depth=2 (repeatable)")
    p = sub.add_parser("single", help="single-shape training shards")
    p.add_argument("out")
    p.add_argument("--n", type=int, default=6000)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--short", action="store_true", help="captions name only colour and kind")
    p = sub.add_parser("eval", help="colour / kind / zero-shot accuracy of every checkpoint of a run")
    p.add_argument("run")
    p.add_argument("--heldout", default=None)
    p = sub.add_parser("captions", help="kind among kind-swapped captions; prompt cosines")
    p.add_argument("model")
    p.add_argument("--heldout", default=None)
    p.add_argument("--limit", type=int, default=400)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    {"probe": cmd_probe, "single": cmd_single, "eval": cmd_eval, "captions": cmd_captions}[a.cmd](a)


if __name__ == "__main__":
    main()
