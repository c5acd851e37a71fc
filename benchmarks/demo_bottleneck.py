"""What limits the demo tokenizer's reconstructions: the same data, the same steps, five autoencoders
from a plain linear one to the demo's QLIP, judged on the validation split (docs/demo.md, "Fifth
round: what limits the reconstructions").

    # after `qlip demo` (its data in runs/demo/data); ~10 min on one core of a 2-core AMD EPYC
    python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 300

    # a subset, more steps
    python benchmarks/demo_bottleneck.py --data runs/demo/data --steps 1000 --only mlp-binary-p8 qlip-binary

Rows (all recon-only, MSE on normalised pixels, AdamW 3e-3, batch 64, cosine schedule, 30 warm-up
steps, 4,096 training images held in memory, one thread):

* ``reference``: the judge on the original validation images after a Gaussian blur and after
  8x8 average pooling (the per-patch mean colour): what sharpness a reconstruction needs;
* ``linear-continuous``: each 8x8 patch -> Linear -> 28 real numbers -> Linear -> patch (no
  quantiser; the 28 numbers are a continuous code of the token's size);
* ``linear-continuous-l2``: the same with the code L2-normalised (what QLIP's bottleneck does
  before BSQ);
* ``mlp-binary-p8`` / ``mlp-binary-p4``: each 8x8 (4x4) patch -> 3-layer MLP (256 wide) -> 28
  binary bits (sign of the L2-normalised code, straight-through gradient: BSQ's forward) -> MLP
  -> patch; no context between patches;
* with ``--only``: ``mlp-binary-p8-commit`` (+ a 0.25-weighted commitment term ``|u - sign(u)/sqrt(L)|^2``
  pulling the code to the cube's corners) and ``mlp-binary-p8-anneal`` (a tanh relaxation
  ``tanh(k u)`` with k rising from 1 to 10 over the first half of training, the hard sign after);
* with ``--only``, the sixth round's rows (docs/demo.md), each a per-8x8-patch variant of
  ``mlp-binary-p8`` that tests one reason the binary code might train slowly:
  ``mlp-binary-p8-bernoulli`` (stochastic binary neurons: bits sampled with probability
  ``sigmoid(u)`` in training, straight-through to the probability; thresholded at 0.5 in
  evaluation), ``mlp-binary-p8-edge`` (+ MSE between the image gradients of the reconstruction and
  the original, weight 1: a non-learned stand-in for LPIPS that rewards edges),
  ``mlp-binary-p8-frozen-enc`` (the encoder left at its random init, only the decoder trained: is
  the decoder the slow part?), ``mlp-binary-p8-linear-dec`` (a linear decoder),
  ``mlp-binary-p8-64bits`` (64 bits instead of 28), ``mlp-continuous-p8`` (the MLPs with a
  continuous code: how fast the MLPs learn without the quantiser), ``pca-thermometer-p8`` (a
  designed code, not learned: the 7 leading principal components of the training patches, each
  cut at 4 quantiles, i.e. 4 sign bits of a shifted projection, the only code a sign of a linear
  map can give one number; the encoder fixed, an MLP decoder trained); ``mlp-binary-p8-nonorm``
  (the eighth round: the sign without the L2 normalisation before it, so that the straight-through
  gradient is not divided by the pre-normalisation norm); ``mlp-binary-p8-mix`` /
  ``mlp-binary-p8-mix-decay`` (the ninth round: quantiser dropout, half of the codes left
  continuous in training, or a share falling from all to none over the first 80% of the steps);
  ``mlp-binary-p8-noise`` / ``mlp-binary-p8-noise-hard`` (the tenth round: a noisy channel, the
  decoder reads ``tanh(u) + N(0, 0.5^2)`` in training so that only saturated, i.e. binary, numbers
  carry information, with a smooth gradient instead of the straight-through one; evaluation reads
  the sign; ``-hard`` trains the last 20% of the steps with the straight-through sign);
  ``mlp-binary-p8-rotation`` (the twelfth round: the rotation trick of Fifty et al. 2024 instead of
  the straight-through copy: the gradient at the sign is rotated by the rotation that takes the
  unit code to its corner of the cube); ``mlp-binary-p8-l1`` / ``mlp-continuous-p8-l1`` (the
  thirteenth round: the same autoencoders trained with L1 instead of MSE on the pixels, BSQ-ViT's
  choice: the per-pixel median of what a code stands for instead of the mean, i.e. a sharper edge);
* ``qlip-continuous`` / ``qlip-binary``: the demo's QLIP (``qlip-demo`` preset, conv stem, one
  encoder block, decoder 128 x 3) without the text tower, its bottleneck projection and
  up-projection with the BSQ step skipped (continuous) or kept (binary, with the 0.1-weighted BSQ
  entropy loss of the demo recipe).

Prints one JSON line per row (PSNR on [0, 1] images, the independent shape judge's colour / kind
accuracy on the reconstructions, training seconds) and writes ``--out`` (default
runs/bottleneck.json). Only the validation split is read.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

# keep benchmarks/ off sys.path (its scripts are not modules of this program)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from qlip.quant.bsq import cross_correlation  # noqa: E402  (the penalty of loss.bit_decorrelation)

BITS = 28
ROWS = ("linear-continuous", "linear-continuous-l2", "mlp-binary-p8", "mlp-binary-p4", "qlip-continuous", "qlip-binary")
# ways to train the binary code faster, tried on the per-patch MLP (rows only with --only)
EXTRA = ("mlp-binary-p8-commit", "mlp-binary-p8-anneal", "mlp-binary-p8-bernoulli", "mlp-binary-p8-edge",
         "mlp-binary-p8-frozen-enc", "mlp-binary-p8-linear-dec", "mlp-binary-p8-64bits", "mlp-continuous-p8",
         "pca-thermometer-p8", "mlp-binary-p8-nonorm", "mlp-binary-p8-mix", "mlp-binary-p8-mix-decay", "mlp-binary-p8-balanced",
         "mlp-binary-p8-decorrelated", "mlp-binary-p8-decorrelated-nobn", "mlp-binary-p8-noise",
         "mlp-binary-p8-noise-hard", "mlp-binary-p8-rotation", "mlp-binary-p8-l1", "mlp-continuous-p8-l1")
EDGE_WEIGHT = 1.0  # mlp-binary-p8-edge: weight of the image-gradient MSE
DECOR_WEIGHT = 1.0  # mlp-binary-p8-decorrelated: weight of the bits' squared cross-correlations
NOISE_SIGMA = 0.5  # mlp-binary-p8-noise: the channel's standard deviation (per code number, before 1/sqrt(L))


def _sign(u: torch.Tensor, scale: float) -> torch.Tensor:
    """BSQ's forward: +-scale by the sign of ``u`` (0 -> -scale)."""
    return torch.where(u > 0, 1.0, -1.0) * scale


def _straight_through(soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward pass, the gradient of ``soft`` in the backward pass."""
    return soft + (hard - soft).detach()


def _rotation_trick(u: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """``hard`` in the forward pass; backward, the gradient rotated by the rotation taking ``u`` to
    ``hard`` (Fifty et al. 2024, "the rotation trick"; both are unit vectors here, so no rescaling).

    With ``r = (u + hard) / |u + hard|`` (no gradient), ``R = I - 2 r r^T + 2 hard u^T`` maps ``u`` to
    ``hard``; ``R`` is held constant, so ``d loss / d u = R^T d loss / d hard`` instead of the
    straight-through identity.
    """
    e, q = u.detach(), hard.detach()
    r = F.normalize(e + q, dim=-1)
    return u - 2 * (u * r).sum(-1, keepdim=True) * r + 2 * (u * e).sum(-1, keepdim=True) * q


def gradient_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """MSE between the horizontal and vertical pixel differences of two image batches."""
    return (F.mse_loss(a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1])
            + F.mse_loss(a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]))


def load_train(data: str, n: int) -> torch.Tensor:
    """The first ``n`` training images of the demo's shards as (n, 3, H, W) floats in [0, 1]."""
    import collections

    import numpy as np

    from qlip.data.images import decode_image
    from qlip.data.pipeline import read_tar_samples
    out: List[torch.Tensor] = []
    stats: collections.Counter = collections.Counter()
    for shard in sorted(glob.glob(os.path.join(data, "shapes-train-*.tar"))):
        for _, sample in read_tar_samples(shard, stats, print):
            ext = next((e for e in ("png", "jpg", "webp") if e in sample), None)
            if ext is None:
                continue
            arr = np.asarray(decode_image(sample[ext]).convert("RGB"))
            out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
            if len(out) >= n:
                return torch.stack(out).float() / 255
    if not out:
        raise SystemExit(f"no training images in {data}/shapes-train-*.tar: run `qlip demo` first")
    return torch.stack(out).float() / 255


def load_val(data: str) -> Tuple[torch.Tensor, torch.Tensor]:
    import torchvision.transforms.functional as TF

    from qlip.data.evalsets import open_dataset
    pattern = os.path.join(data, "shapes-val-*.tar")
    if not glob.glob(pattern):
        raise SystemExit(f"no validation shards {pattern}: run `qlip demo` first")
    xs, ys = [], []
    for x, y in open_dataset(pattern).batches(lambda ims: torch.stack([TF.to_tensor(i.convert("RGB")) for i in ims]),
                                              256, None):
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, 3 p p), per-token order (c, y, x) like the decoder's unpatchify."""
    B, C, H, W = x.shape
    return x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatches(t: torch.Tensor, p: int, size: int) -> torch.Tensor:
    B, g = t.shape[0], size // p
    return t.reshape(B, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, 3, size, size)


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class PatchAE(nn.Module):
    """Patch -> code of ``bits`` numbers -> patch, each patch on its own.

    ``mode``: ``continuous`` (no quantiser), ``l2`` (L2-normalised, no quantiser), ``binary`` (BSQ's
    forward, straight-through), ``commit``, ``anneal``, ``bernoulli``, ``edge`` (the rows of the same
    names in the module's docstring). ``hidden=0``: linear encoder and decoder; ``linear_dec``: a
    linear decoder behind the MLP encoder.
    """

    def __init__(self, patch: int, hidden: int, mode: str, bits: int = BITS, linear_dec: bool = False,
                 decor_weight: float = DECOR_WEIGHT, recon: str = "mse"):
        super().__init__()
        d = 3 * patch * patch
        self.patch, self.mode, self.bits, self.decor_weight = patch, mode, bits, decor_weight
        self.recon = recon  # the training loss on pixels (qlip.losses.reconstruction_loss kind)
        self.progress = 0.0  # fraction of training done (set by the loop; the annealed relaxation reads it)
        self.enc = mlp(d, hidden, bits) if hidden else nn.Linear(d, bits)
        self.dec = mlp(bits, hidden, d) if hidden and not linear_dec else nn.Linear(bits, d)
        # balanced bits (the ninth round): each pre-sign number centred and scaled over the batch
        self.bn = nn.BatchNorm1d(bits, affine=False) if mode in ("balanced", "decorrelated") else None

    def code(self, u: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pre-quantisation outputs -> (the decoder's input, an auxiliary loss)."""
        aux = u.new_zeros(())
        scale = 1 / math.sqrt(self.bits)
        if self.mode == "continuous":
            return u, aux
        if self.mode == "bernoulli":  # stochastic binary neuron, straight-through to the probability
            prob = torch.sigmoid(u)
            bit = (torch.rand_like(prob) < prob).to(prob.dtype) if self.training else (prob > 0.5).to(prob.dtype)
            return (2 * (bit + prob - prob.detach()) - 1) * scale, aux
        if self.mode == "anneal" and self.training and self.progress < 0.5:  # soft codes first
            return torch.tanh(u * (1 + 18 * self.progress)) * scale, aux
        if self.mode.startswith("noise") and self.training and not (self.mode == "noise-hard" and self.progress >= 0.8):
            # a noisy channel (the tenth round; semantic hashing's trick): the decoder reads
            # tanh(u) + Gaussian noise, so the only way to pass information is to saturate, and the
            # code becomes binary with a smooth gradient (no straight-through); evaluation reads the
            # sign; "noise-hard" switches to the straight-through sign for the last 20% of steps
            return (torch.tanh(u) + NOISE_SIGMA * torch.randn_like(u)) * scale, aux
        if self.mode.startswith("noise"):
            return _straight_through(torch.tanh(u) * scale, _sign(u, scale)), aux
        if self.mode == "nonorm":  # BSQ's sign without the L2 normalisation before it: the
            # straight-through gradient is not divided by |u| (which grows in training)
            return _straight_through(u * scale, _sign(u, scale)), aux
        if self.bn is not None:  # every bit splits the batch near 50/50: no constant (dead) bits
            u = self.bn(u.reshape(-1, u.shape[-1])).view(u.shape)
        if self.mode.startswith("decorrelated") and self.training:  # no two bits say the same thing
            aux = aux + self.decor_weight * cross_correlation(u)
        u = F.normalize(u, dim=-1)
        if self.mode == "l2":
            return u, aux
        hard = _sign(u, scale)
        if self.mode == "commit":
            aux = 0.25 * ((u - hard) ** 2).sum(-1).mean()
        if self.mode == "rotation":
            return (_rotation_trick(u, hard) if self.training else hard), aux
        ste = _straight_through(u, hard)
        if self.mode in ("mix", "mix-decay") and self.training:
            # quantiser dropout (the ninth round): a random share of the codes stays continuous (the
            # unit-norm u, on the sphere through the cube's corners), so the decoder is also trained
            # between the corners and the straight-through gradient at a corner is not a guess;
            # the share is 1/2, or falls from 1 to 0 over training (mix-decay); evaluation is hard
            share = 0.5 if self.mode == "mix" else max(0.0, 1.0 - self.progress / 0.8)
            soft = torch.rand(u.shape[:-1] + (1,), device=u.device) < share
            return torch.where(soft, u, ste), aux
        return ste, aux

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        q, aux = self.code(self.enc(patches(x, self.patch)))
        recon = unpatches(self.dec(q), self.patch, x.shape[-1])
        if self.mode == "edge" and self.training:
            aux = aux + EDGE_WEIGHT * gradient_mse(recon, x)
        return recon, aux


def pca_thermometer(train: torch.Tensor, patch: int = 8, components: int = 7, cuts: int = 4, hidden: int = 256) -> PatchAE:
    """A designed binary code: the leading principal components of normalised training patches,
    each cut at ``cuts`` quantiles (bit = sign(projection - quantile)); the encoder is fixed."""
    from qlip.model.config import OPENAI_MEAN, OPENAI_STD
    from qlip.model.preprocess import normalize
    x = patches(normalize(train[:1024], OPENAI_MEAN, OPENAI_STD), patch).reshape(-1, 3 * patch * patch)
    mean = x.mean(0)
    _, _, v = torch.pca_lowrank(x - mean, q=components + 8, center=False, niter=4)
    levels = torch.arange(1, cuts + 1, dtype=x.dtype) / (cuts + 1)
    weight, bias = [], []
    for j in range(components):
        proj = (x - mean) @ v[:, j]
        for t in torch.quantile(proj[:200_000], levels):
            weight.append(v[:, j])
            bias.append(-(mean @ v[:, j]) - t)
    model = PatchAE(patch, hidden, "binary", bits=components * cuts)
    model.enc = nn.Linear(3 * patch * patch, components * cuts)
    with torch.no_grad():
        model.enc.weight.copy_(torch.stack(weight))
        model.enc.bias.copy_(torch.stack(bias))
    model.enc.requires_grad_(False)
    return model


class QLIPAE(nn.Module):
    """The demo's QLIP without its text tower; ``binary=False`` skips the BSQ step."""

    def __init__(self, binary: bool):
        super().__init__()
        from qlip.model import QLIP, get_preset
        self.m = QLIP(get_preset("qlip-demo", **{"vision.stem": "conv", "vision.depth": 1}))
        self.m.text = None
        self.binary = binary
        self.recon = "mse"  # the training loss on pixels: the demo recipe's

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.binary:
            p = self.m.image_pass(x, embed=False)
            return p.recon, 0.1 * p.quant_loss  # the demo recipe's alpha_q
        bn = self.m.bottleneck
        return self.m.decoder(bn.up(bn.project(self.m.visual(x)[:, 1:]))), x.new_zeros(())


def frozen_encoder(model: PatchAE) -> PatchAE:
    model.enc.requires_grad_(False)
    return model


def build(row: str, train: torch.Tensor, decor_weight: float = DECOR_WEIGHT) -> nn.Module:
    return {"linear-continuous": lambda: PatchAE(8, 0, "continuous"),
            "linear-continuous-l2": lambda: PatchAE(8, 0, "l2"),
            "mlp-binary-p8": lambda: PatchAE(8, 256, "binary"),
            "mlp-binary-p4": lambda: PatchAE(4, 256, "binary"),
            "mlp-binary-p8-commit": lambda: PatchAE(8, 256, "commit"),
            "mlp-binary-p8-anneal": lambda: PatchAE(8, 256, "anneal"),
            "mlp-binary-p8-bernoulli": lambda: PatchAE(8, 256, "bernoulli"),
            "mlp-binary-p8-edge": lambda: PatchAE(8, 256, "edge"),
            "mlp-binary-p8-frozen-enc": lambda: frozen_encoder(PatchAE(8, 256, "binary")),
            "mlp-binary-p8-linear-dec": lambda: PatchAE(8, 256, "binary", linear_dec=True),
            "mlp-binary-p8-64bits": lambda: PatchAE(8, 256, "binary", bits=64),
            "mlp-binary-p8-nonorm": lambda: PatchAE(8, 256, "nonorm"),
            "mlp-binary-p8-mix": lambda: PatchAE(8, 256, "mix"),
            "mlp-binary-p8-mix-decay": lambda: PatchAE(8, 256, "mix-decay"),
            "mlp-binary-p8-balanced": lambda: PatchAE(8, 256, "balanced"),
            "mlp-binary-p8-decorrelated": lambda: PatchAE(8, 256, "decorrelated", decor_weight=decor_weight),
            "mlp-binary-p8-decorrelated-nobn": lambda: PatchAE(8, 256, "decorrelated-nobn", decor_weight=decor_weight),
            "mlp-binary-p8-noise": lambda: PatchAE(8, 256, "noise"),
            "mlp-binary-p8-noise-hard": lambda: PatchAE(8, 256, "noise-hard"),
            "mlp-binary-p8-rotation": lambda: PatchAE(8, 256, "rotation"),
            "mlp-continuous-p8": lambda: PatchAE(8, 256, "continuous"),
            "mlp-binary-p8-l1": lambda: PatchAE(8, 256, "binary", recon="l1"),
            "mlp-continuous-p8-l1": lambda: PatchAE(8, 256, "continuous", recon="l1"),
            "pca-thermometer-p8": lambda: pca_thermometer(train),
            "qlip-continuous": lambda: QLIPAE(False),
            "qlip-binary": lambda: QLIPAE(True)}[row]()


def train_row(row: str, train: torch.Tensor, steps: int, lr: float, batch: int, seed: int,
              decor_weight: float = DECOR_WEIGHT) -> Tuple[nn.Module, float]:
    from qlip.losses import reconstruction_loss
    from qlip.model.config import OPENAI_MEAN, OPENAI_STD
    from qlip.model.preprocess import normalize
    torch.manual_seed(seed)
    model = build(row, train, decor_weight)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    model.train()
    for step in range(1, steps + 1):
        factor = min(1.0, step / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * factor
        if isinstance(model, PatchAE):
            model.progress = (step - 1) / steps
        x = normalize(train[torch.randint(0, len(train), (batch,), generator=g)], OPENAI_MEAN, OPENAI_STD)
        recon, aux = model(x)
        loss = reconstruction_loss(recon, x, model.recon) + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 5.0)
        opt.step()
    return model, time.time() - t0


def judged(name: str, images01: torch.Tensor, val: torch.Tensor, labels: torch.Tensor, **extra) -> Dict:
    from qlip.eval.recon import psnr_per_image
    from qlip.eval.shape_judge import judge_accuracy
    a = images01.clamp(0, 1)
    j = judge_accuracy(a, labels)
    out = {"row": name, "psnr": round(float(psnr_per_image(a, val).clamp(max=99).mean()), 2),
           "judge_colour": round(j["colour"], 3), "judge_kind": round(j["kind"], 3)}
    out.update(extra)
    print(json.dumps(out), flush=True)
    return out


@torch.no_grad()
def code_usage(model: nn.Module, val: torch.Tensor) -> Dict:
    """Per-patch rows: distinct codes among the validation patches and the mean entropy of a bit
    (1 bit: the bit splits the patches 50/50; 0: a constant, dead bit). Empty for the others."""
    from qlip.model.config import OPENAI_MEAN, OPENAI_STD
    from qlip.model.preprocess import normalize
    if not isinstance(model, PatchAE) or model.mode in ("continuous", "l2"):
        return {}
    model.eval()
    u = model.enc(patches(normalize(val, OPENAI_MEAN, OPENAI_STD), model.patch)).flatten(0, -2)
    if model.bn is not None:
        u = model.bn(u)
    bits = u > 0
    p = bits.double().mean(0).clamp(1e-12, 1 - 1e-12)
    entropy = -(p * p.log2() + (1 - p) * (1 - p).log2())
    weights = 1 << torch.arange(model.bits, dtype=torch.int64) if model.bits < 63 else None
    distinct = int(torch.unique((bits.long() * weights).sum(-1)).numel()) if weights is not None else None
    return {"distinct_codes": distinct, "bit_entropy_mean": round(float(entropy.mean()), 3)}


@torch.no_grad()
def reconstruct(model: nn.Module, val: torch.Tensor) -> torch.Tensor:
    from qlip.model.config import OPENAI_MEAN, OPENAI_STD
    from qlip.model.preprocess import denormalize, normalize
    model.eval()
    out = [denormalize(model(normalize(val[i:i + 64], OPENAI_MEAN, OPENAI_STD))[0], OPENAI_MEAN, OPENAI_STD)
           for i in range(0, len(val), 64)]
    return torch.cat(out)


def references(val: torch.Tensor, labels: torch.Tensor) -> List[Dict]:
    import torchvision.transforms.functional as TF
    rows = [judged("reference: original", val, val, labels)]
    for sigma in (1.0, 1.5, 2.0, 3.0):
        rows.append(judged(f"reference: blur sigma {sigma}", TF.gaussian_blur(val, 2 * round(3 * sigma) + 1, sigma), val, labels))
    pooled: Callable[[int], torch.Tensor] = lambda k: F.interpolate(F.avg_pool2d(val, k), scale_factor=k, mode="nearest")
    rows.append(judged("reference: 8x8 patch mean", pooled(8), val, labels))
    rows.append(judged("reference: 4x4 patch mean", pooled(4), val, labels))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/data", help="the demo's data folder")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--train-images", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", choices=ROWS + EXTRA, default=None, help=f"rows to train (default: {', '.join(ROWS)})")
    ap.add_argument("--out", default="runs/bottleneck.json")
    ap.add_argument("--decor-weight", type=float, default=DECOR_WEIGHT,
                    help="mlp-binary-p8-decorrelated: weight of the bits' squared cross-correlations")
    ap.add_argument("--references", action=argparse.BooleanOptionalAction, default=True,
                    help="judge the degraded originals too (blur, patch means)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    val, labels = load_val(a.data)
    train = load_train(a.data, a.train_images)
    rows = references(val, labels) if a.references else []
    for row in a.only or ROWS:
        model, secs = train_row(row, train, a.steps, a.lr, a.batch, a.seed, a.decor_weight)
        rows.append(judged(row, reconstruct(model, val), val, labels, steps=a.steps, train_s=round(secs, 1),
                           **code_usage(model, val)))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"settings": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
