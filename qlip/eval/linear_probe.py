"""Linear probing on frozen image features (the paper's Table 10).

Probing positions (Table 10's "Probing Pos."):

* ``cls``: the [CLS] token of the last encoder layer after the encoder's final LayerNorm
  (``visual.ln_post``), i.e. the vector the CLIP projection head reads (width D, before the
  projection);
* ``avg``: the mean over the patch tokens of the last layer (``encode_image_features(x,
  layer=-1)``; the patch tokens have no final norm in QLIP, they go to the bottleneck as they are);
* ``cls+avg``: both concatenated.

Probe (the CLIP paper's logistic-regression protocol, not the paper's SGD recipe of Table 11):
features are standardised with the training mean / standard deviation; a multinomial logistic
regression ``softmax(x W + b)`` is fitted full-batch with L-BFGS (strong-Wolfe line search) on the
mean cross-entropy + ``l2 / 2 * ||W||^2`` (bias not penalised). ``l2`` is chosen from a
log-spaced grid by accuracy on a held-out fraction (default 10 %, seed 0) of the training split;
the probe is then refitted on the whole training split with that ``l2`` and the accuracy on the
test split is reported.

Features are extracted batch by batch (images are never held all at once); the feature arrays
(N x D float32) are kept in memory.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from qlip.errors import DataError, QLIPError
from qlip.data.evalsets import Batch
from qlip.eval.common import iter_limited, model_device

POSITIONS = ("cls", "avg", "cls+avg")
DEFAULT_L2_GRID = tuple(10.0**k for k in range(-6, 1))  # 1e-6 ... 1


@torch.no_grad()
def probe_features(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"cls": (B,D), "avg": (B,D)}`` frozen features of normalised images (see module doc)."""
    feats = model.encode_image_features(images, layer=-1, include_cls=True)  # (B, 1+N, D), no final norm
    h, w = images.shape[-2:]
    p = int(model.patch_size)
    n_patches = (h // p) * (w // p)
    if feats.shape[1] != n_patches + 1:
        raise QLIPError(f"encode_image_features returned {feats.shape[1]} tokens, expected 1 + {n_patches}")
    cls, patches = feats[:, 0], feats[:, 1:]
    norm = _final_norm(model)
    if norm is not None:
        cls = norm(cls)
    return {"cls": cls.float(), "avg": patches.float().mean(dim=1)}


def _final_norm(model):
    """The vision encoder's final LayerNorm (applied to [CLS] before the projection), if any."""
    mod = getattr(getattr(model, "visual", None), "ln_post", None)
    return mod if isinstance(mod, torch.nn.Module) else None


@torch.no_grad()
def extract_features(model, batches: Iterable[Batch], *, limit: Optional[int] = None,
                     progress: bool = False, desc: str = "features") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Stream batches through the frozen encoder; returns (``{"cls","avg"}`` -> (N,D) float32, labels)."""
    from tqdm.auto import tqdm

    device = model_device(model)
    out: dict[str, list[np.ndarray]] = {"cls": [], "avg": []}
    labels: list[np.ndarray] = []
    for images, y in tqdm(iter_limited(batches, limit), desc=desc, disable=not progress, leave=False):
        feats = probe_features(model, images.to(device))
        for k in out:
            out[k].append(feats[k].cpu().numpy().astype(np.float32))
        labels.append(torch.as_tensor(y).cpu().numpy().astype(np.int64))
    if not labels:
        raise DataError("linear probe: no images")
    return {k: np.concatenate(v) for k, v in out.items()}, np.concatenate(labels)


def select_position(feats: dict[str, np.ndarray], position: str) -> np.ndarray:
    if position == "cls+avg":
        return np.concatenate([feats["cls"], feats["avg"]], axis=1)
    if position not in feats:
        raise QLIPError(f"unknown probing position {position!r} (use one of {', '.join(POSITIONS)})")
    return feats[position]


class LogisticRegression:
    """Multinomial logistic regression with an L2 penalty, full-batch L-BFGS in torch."""

    def __init__(self, l2: float = 1e-4, max_iter: int = 1000, device: str = "cpu") -> None:
        self.l2, self.max_iter, self.device = l2, max_iter, torch.device(device)
        self.mean = self.std = self.weight = self.bias = None

    def _standardise(self, x: np.ndarray) -> torch.Tensor:
        return (torch.as_tensor(x, dtype=torch.float32, device=self.device) - self.mean) / self.std

    def fit(self, x: np.ndarray, y: np.ndarray, num_classes: int, init: Optional["LogisticRegression"] = None):
        xt = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        self.mean = xt.mean(dim=0)
        self.std = xt.std(dim=0, unbiased=False).clamp_min(1e-6)
        xt = (xt - self.mean) / self.std
        yt = torch.as_tensor(y, dtype=torch.int64, device=self.device)
        d = xt.shape[1]
        if init is not None and init.weight is not None and init.weight.shape == (d, num_classes):
            w0, b0 = init.weight.clone(), init.bias.clone()
        else:
            w0 = torch.zeros(d, num_classes, device=self.device)
            b0 = torch.zeros(num_classes, device=self.device)
        weight = w0.requires_grad_(True)
        bias = b0.requires_grad_(True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=self.max_iter, history_size=20,
                                tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(xt @ weight + bias, yt) + 0.5 * self.l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = weight.detach(), bias.detach()
        return self

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        return (self._standardise(x) @ self.weight + self.bias).argmax(dim=1).cpu().numpy()

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return float((self.predict(x) == np.asarray(y)).mean())  # a fraction, as every accuracy


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
              l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.1, seed: int = 0,
              max_iter: int = 1000, device: str = "cpu") -> dict:
    """L2 sweep on a held-out part of the training split, refit on all of it, test accuracy (fraction)."""
    if not 0.0 < val_fraction < 1.0:
        raise QLIPError(f"validation fraction must be in (0, 1), got {val_fraction}")
    if len(x_train) < 2 or len(x_test) < 1:
        raise DataError(f"linear probe needs >= 2 training and >= 1 test images (got {len(x_train)}, {len(x_test)})")
    if (y_train < 0).any() or (y_test < 0).any():
        raise DataError("linear probe needs labelled images (class sub-folders or .cls labels)")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x_train))
    n_val = min(max(1, int(round(val_fraction * len(x_train)))), len(x_train) - 1)
    val_idx, fit_idx = order[:n_val], order[n_val:]
    grid = sorted(float(v) for v in l2_grid)[::-1]  # strong to weak penalty, warm-started
    val_acc: dict[str, float] = {}
    prev = None
    for l2 in grid:
        clf = LogisticRegression(l2, max_iter, device).fit(x_train[fit_idx], y_train[fit_idx], num_classes, init=prev)
        val_acc[f"{l2:g}"] = clf.accuracy(x_train[val_idx], y_train[val_idx])
        prev = clf
    best = max(grid, key=lambda v: (val_acc[f"{v:g}"], v))  # ties -> stronger penalty
    final = LogisticRegression(best, max_iter, device).fit(x_train, y_train, num_classes)
    return {
        "accuracy": final.accuracy(x_test, y_test),
        "train_accuracy": final.accuracy(x_train, y_train),
        "l2": best,
        "val_accuracy": val_acc,
        "n_train": int(len(x_train)),
        "n_val": int(n_val),
        "n_test": int(len(x_test)),
        "dim": int(x_train.shape[1]),
        "num_classes": num_classes,
    }


def evaluate_linear_probe(model, train_batches: Iterable[Batch], test_batches: Iterable[Batch], *,
                          positions: Sequence[str] = POSITIONS, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                          val_fraction: float = 0.1, limit: Optional[int] = None, progress: bool = False) -> dict:
    """Extract frozen features of both splits and fit one probe per position.

    Returns ``{position: fit_probe(...) result}``.
    """
    for pos in positions:
        if pos not in POSITIONS:
            raise QLIPError(f"unknown probing position {pos!r} (use one of {', '.join(POSITIONS)})")
    tr, ytr = extract_features(model, train_batches, limit=limit, progress=progress, desc="train features")
    te, yte = extract_features(model, test_batches, limit=limit, progress=progress, desc="test features")
    device = str(model_device(model))
    return {pos: fit_probe(select_position(tr, pos), ytr, select_position(te, pos), yte, l2_grid=l2_grid,
                           val_fraction=val_fraction, device=device) for pos in positions}


def run_linear_probe(model, train_dataset, test_dataset, *, batch_size: int = 32, limit: Optional[int] = None,
                     positions: Sequence[str] = POSITIONS, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                     val_fraction: float = 0.1, progress: bool = True) -> dict:
    """Linear probe on opened datasets; both splits must have the same class folders."""
    for ds in (train_dataset, test_dataset):
        if not ds.labelled:
            raise DataError(f"{ds.describe()}: linear probing needs class sub-folders or labelled shards")
    if train_dataset.classes is not None and test_dataset.classes is not None \
            and train_dataset.classes != test_dataset.classes:
        raise DataError(
            f"train and test class folders differ ({len(train_dataset.classes)} vs {len(test_dataset.classes)} classes)"
        )
    return evaluate_linear_probe(
        model,
        train_dataset.batches(model.preprocess, batch_size, limit),
        test_dataset.batches(model.preprocess, batch_size, limit),
        positions=positions, l2_grid=l2_grid, val_fraction=val_fraction, progress=progress,
    )
