"""How much shape *kind* do a QLIP encoder's VLM features hold? (issue 16: the kind target)

Reads the standardised hidden state ``--layer`` (default -2, what ``qlip demo vlm`` feeds the
LLM) of ``--qlip`` on ``--train`` single-shape training images and the first 200 single-shape
validation images of the shapes generator, and trains kind classifiers on them directly (no
language model, no other question types):

* ``linear``: one linear layer over all patch tokens, flattened (position-specific weights);
* ``tiny-transformer merge k``: the VLM's pipeline without the language: ``mlp2x_gelu`` projector
  (after :func:`qlip.vlm.projector.merge_tokens` with ``k``), a 2-block pre-norm transformer of
  the demo's tiny LLM width (64, 4 heads, MLP 128) and a learned query token read by a linear head.

The gap between these and the VLM's kind accuracy is what the VLM's training (the question mix,
the LM loss) loses; the ceiling itself is what the features allow. Prints one JSON line::

    OMP_NUM_THREADS=1 python benchmarks/vlm_kind_probe.py --qlip runs/demo/qlip --train 991
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def single_shape_features(model, split: str, n: int, layer: int, size: int):
    from qlip.data.shapes import KINDS, make_sample
    from qlip.model.preprocess import normalize
    imgs, kinds, i = [], [], 0
    while len(kinds) < n:
        img, _, meta = make_sample(i, size=size, split=split)
        i += 1
        if len(meta["shapes"]) != 1:
            continue
        imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
        kinds.append(KINDS.index(meta["shapes"][0]["kind"]))
    pp = model.config.preprocess
    x = torch.stack([normalize(t, pp.mean, pp.std) for t in imgs])
    with torch.no_grad():
        f = torch.cat([model.encode_image_features(x[j:j + 256], layer=layer) for j in range(0, len(x), 256)])
    return f, torch.tensor(kinds)


class TinyReader(nn.Module):
    def __init__(self, width: int, tokens: int, merge: int, hidden: int = 64):
        super().__init__()
        self.merge = merge
        self.proj = nn.Sequential(nn.Linear(width * merge * merge, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.query = nn.Parameter(torch.zeros(1, 1, hidden))
        layer = nn.TransformerEncoderLayer(hidden, 4, 2 * hidden, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(hidden, 4)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        from qlip.vlm.projector import merge_tokens
        h = self.proj(merge_tokens(f, self.merge))
        h = torch.cat([h, self.query.expand(len(h), -1, -1)], 1)
        return self.head(self.blocks(h)[:, -1])


def fit(model: nn.Module, ftr, ytr, fva, yva, steps: int, lr: float, batch: int = 16) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(len(ftr), (batch,), generator=g)
        loss = F.cross_entropy(model(ftr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return {"train": (model(ftr[:500]).argmax(1) == ytr[:500]).float().mean().item(),
                "val": (model(fva).argmax(1) == yva).float().mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--qlip", default="runs/demo/qlip")
    p.add_argument("--layer", type=int, default=-2)
    p.add_argument("--train", type=int, default=991, help="single-shape training images (the VLM demo has ~991)")
    p.add_argument("--val", type=int, default=200)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--size", type=int, default=64)
    a = p.parse_args()
    import qlip
    torch.manual_seed(0)
    model = qlip.load(a.qlip).float().eval()
    t0 = time.time()
    ftr, ytr = single_shape_features(model, "train", a.train, a.layer, a.size)
    fva, yva = single_shape_features(model, "val", a.val, a.layer, a.size)
    mu, sd = ftr.mean((0, 1)), ftr.std((0, 1))  # the VLM's feature_norm: standardize (training statistics)
    ftr, fva = (ftr - mu) / sd, (fva - mu) / sd
    out = {"qlip": a.qlip, "layer": a.layer, "train_images": a.train, "val_images": a.val, "steps": a.steps,
           "features_s": round(time.time() - t0, 1)}
    torch.manual_seed(0)
    out["linear"] = fit(nn.Sequential(nn.Flatten(), nn.Linear(ftr.shape[1] * ftr.shape[2], 4)),
                        ftr, ytr, fva, yva, a.steps, 1e-3)
    for merge in (1, 2):
        torch.manual_seed(0)
        out[f"tiny_transformer_merge{merge}"] = fit(TinyReader(ftr.shape[2], ftr.shape[1], merge),
                                                     ftr, ytr, fva, yva, a.steps, 3e-3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
