"""Is the shape's kind in the demo tokenizer's tokens, or lost before them? (issues 11, 12, 15)

The shape judge finds the right kind in only ~38% of the demo QLIP's reconstructions (chance 25%),
and every downstream model (t2i, UM3 captions and drawings) inherits that ceiling. Two readings
are possible: the 28-bit tokens do not carry the outline (the bottleneck loses it), or they carry
it and the MSE-trained decoder renders it as a blur that a geometric judge cannot read. This
script trains small supervised probes and reports their held-out kind / colour accuracy:

* ``tokens``: a 2-layer conv net over the 8 x 8 grid of 28 bits (+-1), trained on the token shards
  of single-shape training images (kind and colour parsed from their captions), tested on the
  tokens of the demo's test images;
* ``originals`` / ``reconstructions``: the same small conv net on 64 x 64 pixels, trained on the
  first part of the test images and tested on the rest (the test file holds both the original
  images and the QLIP's reconstructions of them; a probe, not a reported figure).

One JSON line per probe; ``--seed`` repeats. Example (the files `qlip demo um3` writes)::

    OMP_NUM_THREADS=1 python benchmarks/token_kind_probe.py --tokens runs/demo-um3/data/tokens \\
        --test runs/demo-um3/data/test.pt
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _labels_from_captions(captions):
    """(kind index, colour index) tensors of captions (their first kind / colour word, as the UM3 demo
    reads captions: ``qlip.data.shapes.caption_colour_kind``); -1 where the caption names none."""
    from qlip.data.shapes import COLOR_NAMES, KINDS, caption_colour_kind
    parsed = [caption_colour_kind(c) for c in captions]
    kinds = [KINDS.index(k) if k else -1 for _, k in parsed]
    colours = [COLOR_NAMES.index(c) if c else -1 for c, _ in parsed]
    return torch.tensor(kinds), torch.tensor(colours)


def _bits(ids: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, H, W) integer ids -> (N, bits, H, W) in {-1, +1}."""
    from qlip.quant.bsq import ids_to_bits
    return (ids_to_bits(ids.long(), bits).float() * 2 - 1).permute(0, 3, 1, 2).contiguous()


class Probe(nn.Module):
    def __init__(self, c_in: int, width: int = 64, stride: int = 1, n_kind: int = 4, n_colour: int = 8):
        super().__init__()
        self.c1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1)
        self.c2 = nn.Conv2d(width, width, 3, stride=stride, padding=1)
        self.c3 = nn.Conv2d(width, width, 3, padding=1)
        self.kind = nn.Linear(2 * width, n_kind)
        self.colour = nn.Linear(2 * width, n_colour)

    def forward(self, x):
        h = F.gelu(self.c3(F.gelu(self.c2(F.gelu(self.c1(x))))))
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return self.kind(h), self.colour(h)


def fit_probe(x_tr, k_tr, c_tr, x_te, k_te, c_te, steps: int, stride: int, seed: int, lr: float = 2e-3):
    torch.manual_seed(seed)
    net = Probe(x_tr.shape[1], stride=stride)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(len(x_tr), (64,), generator=g)
        lk, lc = net(x_tr[i])
        loss = F.cross_entropy(lk, k_tr[i]) + F.cross_entropy(lc, c_tr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        pk, pc = [], []
        for j in range(0, len(x_te), 256):
            a, b = net(x_te[j:j + 256])
            pk.append(a.argmax(1))
            pc.append(b.argmax(1))
    pk, pc = torch.cat(pk), torch.cat(pc)
    return {"kind_acc": float((pk == k_te).float().mean()), "colour_acc": float((pc == c_te).float().mean()),
            "train_n": len(x_tr), "test_n": len(x_te)}, pk


def main() -> None:
    from qlip.data.shapes import KINDS
    from qlip.data.tokens import TokenShardDataset
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", required=True, help="token shards of single-shape training images (with captions)")
    p.add_argument("--test", required=True, help="the UM3 demo's test.pt (ids, labels, originals, recon)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--image-steps", type=int, default=800)
    p.add_argument("--image-train", type=int, default=480, help="test images the pixel probes train on")
    p.add_argument("--token-train", type=int, default=0,
                   help="training samples of the token probe (0: all; --image-train for a like-for-like count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", default=["tokens", "originals", "reconstructions"])
    a = p.parse_args()
    torch.set_num_threads(1)
    test = torch.load(a.test, weights_only=True)
    n_k = len(KINDS)
    k_te, c_te = test["labels"] % n_k, test["labels"] // n_k
    if "tokens" in a.only:
        shards = TokenShardDataset(a.tokens)
        ids = torch.as_tensor(shards.ids[np.arange(len(shards))].astype(np.int64))
        kinds, colours = _labels_from_captions(shards.captions[np.arange(len(shards))])
        keep = torch.nonzero((kinds >= 0) & (colours >= 0)).flatten()
        if a.token_train:
            keep = keep[:a.token_train]
        gh, gw = test["ids"].shape[1:]
        x_tr = _bits(ids[keep].view(-1, gh, gw), shards.bits)
        t0 = time.time()
        res, pk = fit_probe(x_tr, kinds[keep], colours[keep], _bits(test["ids"], shards.bits), k_te, c_te,
                            a.steps, 1, a.seed)
        # on the test images the pixel probes are tested on too (the last len - image_train)
        res["kind_acc_pixel_test"] = float((pk[a.image_train:] == k_te[a.image_train:]).float().mean())
        print(json.dumps({"probe": "tokens", "seed": a.seed, **res, "s": round(time.time() - t0, 1)}))
    n = a.image_train
    for name, key in (("originals", "originals"), ("reconstructions", "recon")):
        if name not in a.only:
            continue
        x = test[key].float()
        t0 = time.time()
        res, _ = fit_probe(x[:n], k_te[:n], c_te[:n], x[n:], k_te[n:], c_te[n:], a.image_steps, 2, a.seed)
        print(json.dumps({"probe": name, "seed": a.seed, **res, "s": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
