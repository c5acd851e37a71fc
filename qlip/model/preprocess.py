"""Image preprocessing shared by the model API, the CLI and the data pipeline."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import DataError

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS}


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB correctly.

    Alpha (RGBA, LA, PA, P with transparency) is composited on white; 16/32-bit integer
    greyscale (I;16, I) is scaled by its bit depth rather than clipped; CMYK, YCbCr, 1, L, F go
    through PIL's conversions.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max() <= 1.0 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path) -> Image.Image:
    """Open, fully decode and convert an image file to RGB, or raise a one-line DataError."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e.__class__.__name__}: {e})") from None


def resize_center_crop(img: Image.Image, resize: int, crop: int, interpolation: str = "bicubic") -> Image.Image:
    """Resize the shorter side to ``resize`` (aspect kept), then centre-crop ``crop x crop``.

    Same arithmetic as HF's ``CLIPImageProcessor``: the long side becomes
    ``int(resize * long / short)`` and the crop offset is ``(size - crop) // 2``.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _RESAMPLE[interpolation])
    if crop > min(new_w, new_h):
        raise DataError(f"crop {crop} is larger than the resized image {new_w}x{new_h}")
    left, top = (new_w - crop) // 2, (new_h - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL -> (3, H, W) float32 in [0, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x * s + m


def tensor_to_pil(x01: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] (clamped) -> RGB PIL, rounding to the nearest 8-bit value."""
    arr = (x01.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)  # (H, W, 3) uint8: RGB (Pillow's mode= argument is deprecated)
