"""LPIPS perceptual loss (Zhang et al. 2018) with the VGG-16 trunk, as the QLIP paper (stage 2).

Wraps the ``lpips`` package. Two parts have weights:

* the five linear calibration layers ``weights/v0.1/vgg.pth`` ship **inside** the lpips wheel;
* the VGG-16 trunk is torchvision's ImageNet checkpoint ``vgg16-397923af.pth``, which torchvision
  downloads into ``torch.hub.get_dir()/checkpoints/`` on first use.

``backbone="auto"`` (default) resolves the trunk without ever hanging on the network:

1. the checkpoint is already in the torch hub cache -> real LPIPS;
2. ``QLIP_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to a true value (1/true/yes/on) -> no download;
3. otherwise one download attempt with a socket timeout (``download_timeout`` seconds).

When the trunk cannot be obtained, building a :class:`PerceptualLoss` **fails** with a one-line
:class:`qlip.errors.QLIPError` saying where to put the weights file: LPIPS is never silently
random (a stage 2 trained against a random trunk, or a reported random-trunk LPIPS, looks like
the real thing). ``backbone="pretrained"`` does the same. A random trunk is an explicit opt-in,
``backbone="random"`` (never touches the network): ``pnet_rand=True``, seeded, so values are
reproducible; the loss is still a smooth, zero-at-identity feature distance that trains, but its
values are **not comparable to published LPIPS numbers**; one
:class:`LPIPSRandomBackboneWarning` per process says so and ``pretrained_backbone`` is False.
``resolve_lpips_backbone`` itself only answers whether the real trunk is available.

Inputs are images in ``[-1, 1]`` (LPIPS convention). QLIP tensors are CLIP-normalised
(``(x01 - mean) / std``); convert with :func:`normalized_to_pm1` or pass ``input_mean`` /
``input_std`` (e.g. ``model.image_mean`` / ``model.image_std``) and the module converts.
The network is frozen (``requires_grad=False``) and stays in eval mode even when a parent
module is put in train mode; gradients flow to the inputs only. Keep it out of the model
whose ``state_dict`` you checkpoint (it holds ~15M VGG parameters).
"""

from __future__ import annotations

import hashlib
import http.client
import inspect
import os
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from qlip.errors import QLIPError

__all__ = [
    "PerceptualLoss",
    "LPIPSRandomBackboneWarning",
    "normalized_to_pm1",
    "vgg16_weights_path",
    "offline_mode",
    "resolve_lpips_backbone",
]

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_OFFLINE_ENV_VARS = ("QLIP_OFFLINE", "HF_HUB_OFFLINE")
_TRUE = {"1", "true", "yes", "on"}
_RANDOM_BACKBONE_WARNED = False


class LPIPSRandomBackboneWarning(UserWarning):
    """LPIPS runs with a randomly initialised VGG trunk; its values are not the published metric."""


def offline_mode() -> bool:
    """True when ``QLIP_OFFLINE`` or ``HF_HUB_OFFLINE`` is set to 1/true/yes/on."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in _OFFLINE_ENV_VARS)


_TRUNK_WEIGHTS = {"vgg": "VGG16_Weights", "alex": "AlexNet_Weights", "squeeze": "SqueezeNet1_1_Weights"}
_RESOLVED: dict = {}  # (net, backbone) -> bool: one download attempt per process


def _trunk_url(net: str = "vgg") -> str:
    import torchvision.models as tvm
    weights = getattr(tvm, _TRUNK_WEIGHTS[net], None)
    if weights is None:
        return VGG16_URL if net == "vgg" else ""
    return weights.IMAGENET1K_V1.url


def _vgg16_url() -> str:
    return _trunk_url("vgg")


def trunk_weights_path(net: str = "vgg") -> Path:
    """Where torchvision caches the ImageNet checkpoint of an LPIPS trunk (honours ``TORCH_HOME``)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_trunk_url(net))


def vgg16_weights_path() -> Path:
    """Where torchvision caches the VGG-16 ImageNet checkpoint (honours ``TORCH_HOME``)."""
    return trunk_weights_path("vgg")


def _download_vgg16(timeout: float, net: str = "vgg") -> bool:
    """One download attempt with a socket timeout and the sha256 prefix check. True on success."""
    url = _trunk_url(net)
    dest = trunk_weights_path(net)
    # torchvision file names end in the first 8 hex digits of the sha256: vgg16-397923af.pth
    hash_prefix = dest.stem.rsplit("-", 1)[-1]
    tmp_name = None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (fixed https URL)
            sha = hashlib.sha256()
            with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False, suffix=".partial") as out:
                tmp_name = out.name
                while True:
                    block = response.read(1 << 20)
                    if not block:
                        break
                    sha.update(block)
                    out.write(block)
        if not sha.hexdigest().startswith(hash_prefix):
            return False
        os.replace(tmp_name, dest)
        tmp_name = None
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)


def resolve_lpips_backbone(backbone: str = "auto", download_timeout: float = 20.0, net: str = "vgg") -> bool:
    """Decide whether the ``net`` trunk can be pretrained. Returns True (ImageNet trunk) or False (random).

    ``backbone`` is ``"auto"``, ``"pretrained"`` or ``"random"`` (see the module docstring). A failed
    download is remembered for the process, so building several LPIPS modules waits only once.
    """
    if backbone not in ("auto", "pretrained", "random"):
        raise QLIPError(f"LPIPS backbone must be 'auto', 'pretrained' or 'random', got {backbone!r}")
    if net not in _TRUNK_WEIGHTS:
        raise QLIPError(f"LPIPS net must be one of {', '.join(_TRUNK_WEIGHTS)}, got {net!r}")
    if backbone == "random":
        return False
    if trunk_weights_path(net).is_file():
        return True
    if backbone == "auto" and offline_mode():
        return False
    if (net, backbone) not in _RESOLVED:
        _RESOLVED[(net, backbone)] = _download_vgg16(download_timeout, net)
    if _RESOLVED[(net, backbone)]:
        return True
    if backbone == "pretrained":
        raise QLIPError(
            f"LPIPS needs the torchvision {net} weights at {trunk_weights_path(net)} and they could not be "
            f"downloaded from {_trunk_url(net)}; copy the file there or use backbone='random'"
        )
    return False


def missing_trunk_message(net: str = "vgg") -> str:
    """The one-line error when LPIPS cannot get its real trunk (and no random trunk was asked for)."""
    path = trunk_weights_path(net)
    return (f"LPIPS needs the torchvision ImageNet {net} weights, not found at {path}: download "
            f"{_trunk_url(net)} into {path.parent} (TORCH_HOME moves it), or opt in to a random, "
            f"non-comparable trunk with backbone='random' (recipes: loss.lpips_backbone: random; "
            f"qlip eval: --lpips {net}-random)")


def _warn_random_backbone(net: str = "vgg") -> None:
    global _RANDOM_BACKBONE_WARNED
    if _RANDOM_BACKBONE_WARNED:
        return
    _RANDOM_BACKBONE_WARNED = True
    path = trunk_weights_path(net)
    warnings.warn(
        f"LPIPS is using a RANDOMLY INITIALISED {net} trunk (backbone='random'); the loss still trains "
        f"but its values are NOT comparable to published LPIPS numbers. Put {path.name} in {path.parent} "
        f"and use backbone='auto' for the real metric.",
        LPIPSRandomBackboneWarning,
        stacklevel=3,
    )


def normalized_to_pm1(
    x: torch.Tensor,
    mean: Union[Sequence[float], torch.Tensor],
    std: Union[Sequence[float], torch.Tensor],
) -> torch.Tensor:
    """Map CLIP-normalised images ``(x01 - mean) / std`` (B, 3, H, W) to ``[-1, 1]``: ``2 * (x * std + mean) - 1``."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    return (x * std_t + mean_t) * 2.0 - 1.0


class PerceptualLoss(nn.Module):
    """Frozen LPIPS distance between two image batches (paper: VGG trunk, weight 0.1 in stage 2).

    Args:
        net: lpips trunk: ``"vgg"`` (paper), ``"alex"`` or ``"squeeze"``; the random-trunk
            fallback applies to all of them.
        backbone: ``"auto"`` | ``"pretrained"`` | ``"random"`` (see module docstring): without
            the real trunk weights only ``"random"`` builds (an explicit opt-in).
        input_mean, input_std: if given, inputs are CLIP-normalised and converted to [-1, 1];
            otherwise inputs must already be in [-1, 1].
        reduction: ``"mean"`` (scalar over the batch) or ``"none"`` (per-sample ``(B,)``).
        download_timeout: socket timeout (s) of the one download attempt in ``"auto"`` mode.
    """

    def __init__(
        self,
        net: str = "vgg",
        backbone: str = "auto",
        input_mean: Optional[Sequence[float]] = None,
        input_std: Optional[Sequence[float]] = None,
        reduction: str = "mean",
        download_timeout: float = 20.0,
    ):
        super().__init__()
        import lpips

        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if (input_mean is None) != (input_std is None):
            raise ValueError("give both input_mean and input_std, or neither")
        self.reduction = reduction
        self.pretrained_backbone = resolve_lpips_backbone(backbone, download_timeout, net)
        if not self.pretrained_backbone and backbone != "random":
            raise QLIPError(missing_trunk_message(net))
        # Fixed seed so the random trunk (and lpips' throw-away classifier init) is reproducible
        # and the caller's global RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(0)
            # torchvision's deprecation notices about lpips' ``pretrained=`` argument
            warnings.filterwarnings("ignore", message=r".*(parameter 'pretrained'|weight enum).*", category=UserWarning)
            self.lpips = lpips.LPIPS(
                net=net, version="0.1", pretrained=False, pnet_rand=not self.pretrained_backbone, verbose=False
            )
        # the linear heads that ship in the lpips package, read as tensors only: lpips' own
        # ``pretrained=True`` calls torch.load without weights_only, i.e. unpickles on torch < 2.6
        heads = os.path.join(os.path.dirname(inspect.getfile(lpips.LPIPS)), "weights", "v0.1", f"{net}.pth")
        missing, unexpected = self.lpips.load_state_dict(torch.load(heads, map_location="cpu", weights_only=True),
                                                         strict=False)
        lost = [k for k in missing if k.startswith("lin") and not k.startswith("lins.")]  # lins.i = lin{i}
        if unexpected or lost:
            raise QLIPError(f"{heads}: not lpips' linear heads for {net} (unexpected {unexpected[:3]}, "
                            f"missing {lost[:3]})")
        if not self.pretrained_backbone:
            _warn_random_backbone(net)
        self.lpips.requires_grad_(False)
        self.lpips.eval()
        if input_mean is not None:
            self.register_buffer("input_mean", torch.tensor(input_mean, dtype=torch.float32), persistent=False)
            self.register_buffer("input_std", torch.tensor(input_std, dtype=torch.float32), persistent=False)
        else:
            self.input_mean = None
            self.input_std = None

    def train(self, mode: bool = True) -> "PerceptualLoss":
        """The LPIPS network always stays in eval mode (its dropout must stay off)."""
        super().train(mode)
        self.lpips.eval()
        return self

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if input.shape != target.shape or input.dim() != 4 or input.shape[1] != 3:
            raise ValueError(f"PerceptualLoss expects two (B, 3, H, W) batches, got {tuple(input.shape)} and {tuple(target.shape)}")
        if self.input_mean is not None:
            input = normalized_to_pm1(input, self.input_mean.to(input.dtype), self.input_std.to(input.dtype))
            target = normalized_to_pm1(target, self.input_mean.to(target.dtype), self.input_std.to(target.dtype))
        dist = self.lpips(input, target).reshape(input.shape[0])
        return dist.mean() if self.reduction == "mean" else dist
