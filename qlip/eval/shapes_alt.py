"""A second, independently written renderer of labelled single-shape images (renderer robustness).

Why: the demo's zero-shot accuracy is measured on held-out images of the *same* generator it was
trained on (``qlip.data.shapes``). A model can then learn that renderer's pixels (its exact star,
its ±12° rotations, its two sizes, its backgrounds) rather than shapes. This module draws the same
32 classes ("a photo of a {colour} {kind}", the same 8 palette names and 4 kinds) with other code
and other choices, so that accuracy on it says whether the model learned the shapes:

- **drawing method**: signed distance functions evaluated in numpy at pixel centres, with
  analytic anti-aliasing (coverage = clamp(0.5 - distance in px)); the generator fills PIL
  polygons at 4x and box-filters them. No drawing code is shared; only the vocabulary (palette,
  kinds, anchors, the small / large split) is imported.
- **proportions**: ellipses (aspect 0.85-1) instead of circles, squares with rounded corners
  (radius up to 30% of the half side) rotated up to ±40°, isosceles triangles (height 0.7-1.25 x
  base; the generator's are equilateral) rotated up to ±40° and pointing down one time in four,
  5-point stars with a thinner inner radius (0.36-0.48 of the outer; the generator's is 0.5) at
  any rotation;
- **outlines vs fills**: 50% filled, 25% outlines only (stroke 10-18% of the width, the
  background shows inside), 25% filled with a darker border of the same hue;
- **scale and position**: width uniform in 0.20-0.50 of the image (the generator: 0.24 or 0.44,
  ±6%), centre anywhere the shape fits; ``position`` / ``size`` labels are the nearest anchor and
  the generator's small / large split;
- **backgrounds**: solid, linear gradient, radial gradient, stripes, checkerboard, sinusoid
  texture; every background pixel stays >= 80 (RGB distance) from every palette colour, >= 110
  from the shape's colours, and saturated pixels keep >= 35° of hue from every chromatic palette
  colour, so the label stays unambiguous to a person;
- **degradations**: Gaussian blur (sigma 0.4-1.2 px) half of the time, Gaussian pixel noise
  (std 3-10) half of the time; shape colours jittered ±16 per channel around the palette.

Every image is a pure function of ``(seed, index)``; labels cycle through the 32 classes (balanced).

    images, labels = render_alt(320, size=64, seed=0)    # (320, 64, 64, 3) uint8, list of dicts
    evaluate_alt(model, n=320, seed=0)                    # zero-shot top-1 / colour / kind (fractions)
    write_alt_shards("data/shapes-alt", n=320, seed=0)    # labelled shards, as the held-out split

It lives in ``qlip.eval`` (it only imports the vocabulary from ``qlip.data.shapes`` and the
zero-shot classifier of ``qlip.eval.zeroshot``, the one the demo's ``evaluate`` uses).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from qlip.data.shapes import ANCHORS, COLORS, COLOR_NAMES, KINDS, SHAPE_CLASSNAMES, SIZE_FRAC, shape_label

from ..errors import QLIPError

SEED_STREAM = 7919               # keeps these images apart from any generator seed stream
COLOUR_JITTER = 16               # per channel, uniform
WIDTH_RANGE = (0.20, 0.50)       # shape width / image size
SIZE_SPLIT = math.sqrt(SIZE_FRAC["small"] * SIZE_FRAC["large"])  # small / large label boundary
STYLES = ("fill", "outline", "bordered")
STYLE_P = (0.5, 0.25, 0.25)
BACKGROUNDS = ("solid", "linear", "radial", "stripes", "checker", "texture")
BG_PALETTE_DIST = 80.0           # every background pixel vs every palette colour
BG_SHAPE_DIST = 110.0            # ... and vs the shape's fill / border colours
BG_HUE_APART = 35.0              # degrees, for background pixels with chroma >= BG_CHROMA
BG_CHROMA = 50.0
BLUR_P, BLUR_SIGMA = 0.5, (0.4, 1.2)
NOISE_P, NOISE_STD = 0.5, (3.0, 10.0)
PROMPT = "a photo of a {}"       # the demo's zero-shot prompt


# ----------------------------------------------------------------------------------------------
# signed distances (negative inside), coordinates in pixels


def _rotate(x: np.ndarray, y: np.ndarray, cx: float, cy: float, deg: float) -> Tuple[np.ndarray, np.ndarray]:
    """Coordinates of (x, y) in a frame centred at (cx, cy) and rotated by ``deg`` (y down)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    dx, dy = x - cx, y - cy
    return c * dx + s * dy, -s * dx + c * dy


def _sd_ellipse(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipse with half axes a, b (exact for a circle)."""
    return (np.hypot(u / a, v / b) - 1.0) * min(a, b)


def _sd_rounded_square(u: np.ndarray, v: np.ndarray, half: float, radius: float) -> np.ndarray:
    """Signed distance to a square of half side ``half`` whose corners are rounded by ``radius``."""
    qx, qy = np.abs(u) - (half - radius), np.abs(v) - (half - radius)
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside - radius


def _sd_polygon(u: np.ndarray, v: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance to a simple polygon (V, 2): distance to the nearest edge, negative where
    the even-odd crossing rule puts the point inside (works for the non-convex star)."""
    dist = np.full(u.shape, np.inf)
    inside = np.zeros(u.shape, dtype=bool)
    for i in range(len(verts)):
        ax, ay = verts[i]
        bx, by = verts[(i + 1) % len(verts)]
        ex, ey = bx - ax, by - ay
        wx, wy = u - ax, v - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist = np.minimum(dist, np.hypot(wx - ex * t, wy - ey * t))
        crosses = (ay > v) != (by > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = ax + (v - ay) * ex / np.where(ey == 0, 1.0, ey)
        inside ^= crosses & (u < x_at)
    return np.where(inside, -dist, dist)


def _triangle(width: float, height_ratio: float) -> np.ndarray:
    """Isosceles triangle pointing up (y down), bounding box centred at the origin."""
    h = width * height_ratio
    return np.array([(0.0, -h / 2), (width / 2, h / 2), (-width / 2, h / 2)])


def _star(width: float, inner_ratio: float) -> np.ndarray:
    """5-point star whose outer points lie on a circle of diameter ``width``."""
    r_out = width / 2
    pts = []
    for i in range(10):
        r = r_out if i % 2 == 0 else r_out * inner_ratio
        a = math.radians(-90 + 36 * i)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return np.array(pts)


def shape_distance(spec: Dict[str, Any], size: int) -> np.ndarray:
    """(size, size) signed distance in pixels to the shape of ``spec`` at the pixel centres."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    (cx, cy), w = spec["center"], spec["width"]
    u, v = _rotate(xx, yy, cx, cy, spec["rotation"])
    kind = spec["kind"]
    if kind == "circle":
        return _sd_ellipse(u, v, w / 2, w / 2 * spec["aspect"])
    if kind == "square":
        half = w / 2
        return _sd_rounded_square(u, v, half, spec["corner"] * half)
    if kind == "triangle":
        return _sd_polygon(u, v, _triangle(w, spec["height_ratio"]))
    if kind == "star":
        return _sd_polygon(u, v, _star(w, spec["inner_ratio"]))
    raise ValueError(f"no signed distance for {kind!r}")


def _coverage(sd: np.ndarray) -> np.ndarray:
    """Analytic anti-aliasing: a pixel is covered by the part of it on the inside of the edge."""
    return np.clip(0.5 - sd, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# backgrounds


def _hue_deg(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in degrees of (..., 3) RGB from the opponent axes (atan2 form)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360


_PAL = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float64)
_PAL_CHROMATIC_HUES = _hue_deg(_PAL[np.ptp(_PAL, axis=1) > 100])


def _colours_ok(px: np.ndarray, shape_rgbs: List[np.ndarray]) -> bool:
    """True if every background colour (P, 3) is far from the palette and the shape's colours,
    and no saturated one has a palette hue (a pale green background must not make a blue square
    "green")."""
    if np.min(np.linalg.norm(px[:, None] - _PAL[None], axis=-1)) < BG_PALETTE_DIST:
        return False
    if np.min(np.linalg.norm(px[:, None] - np.asarray(shape_rgbs, dtype=np.float64)[None], axis=-1)) < BG_SHAPE_DIST:
        return False
    sat = px[np.ptp(px, axis=1) >= BG_CHROMA]
    if len(sat):
        d = np.abs(_hue_deg(sat)[:, None] - _PAL_CHROMATIC_HUES[None]) % 360
        if np.min(np.minimum(d, 360 - d)) < BG_HUE_APART:
            return False
    return True


def _draw_background(rng: np.random.Generator, kind: str, size: int, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """(size, size, 3) float64 background of one of ``BACKGROUNDS``: every pixel is
    ``c0 * (1 - t) + c1 * t`` for a pattern ``t`` in [0, 1] (a solid one is ``c0``)."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float64) + 0.5) / size
    if kind == "solid":
        return np.broadcast_to(c0, (size, size, 3)).copy()
    if kind == "linear":
        a = rng.uniform(0, 2 * math.pi)
        t = np.clip((math.cos(a) * (xx - 0.5) + math.sin(a) * (yy - 0.5)) / math.sqrt(0.5) + 0.5, 0, 1)
    elif kind == "radial":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.clip(np.hypot(xx - cx, yy - cy) / rng.uniform(0.5, 0.9), 0, 1)
    elif kind == "stripes":
        a, period = rng.uniform(0, math.pi), rng.uniform(5, 14) / size
        phase = (math.cos(a) * xx + math.sin(a) * yy) / period
        t = (np.sin(2 * math.pi * phase) > 0).astype(np.float64) if rng.random() < 0.5 else \
            0.5 + 0.5 * np.sin(2 * math.pi * phase)
    elif kind == "checker":
        cell = rng.uniform(4, 12) / size
        t = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float64)
    elif kind == "texture":
        t = np.zeros_like(xx)
        for _ in range(4):
            f, a, ph = rng.uniform(1.5, 6), rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
            t += np.sin(2 * math.pi * f * (math.cos(a) * xx + math.sin(a) * yy) + ph)
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-9)
    else:
        raise ValueError(f"unknown background {kind!r}")
    return c0 * (1 - t[..., None]) + c1 * t[..., None]


def _sample_background(rng: np.random.Generator, size: int, shape_rgbs: List[np.ndarray]) -> Tuple[str, np.ndarray]:
    """A background whose colours pass `_colours_ok`. Every background pixel lies on the segment
    from ``c0`` to ``c1``, so the segment (33 points, <= 2.5 apart in RGB) is checked, not the pixels."""
    t = np.linspace(0.0, 1.0, 33)[:, None]
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]  # chosen first: uniform over the kinds
    for _ in range(5000):
        c0 = rng.uniform(0, 255, 3)
        c1 = c0 if kind == "solid" else np.clip(c0 + rng.uniform(-90, 90, 3), 0, 255)
        if _colours_ok(c0 * (1 - t) + c1 * t, shape_rgbs):
            return kind, _draw_background(rng, kind, size, c0, c1)
    raise RuntimeError("no background far enough from the shape colours")  # not reached in practice


# ----------------------------------------------------------------------------------------------
# images


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")


def render_one(index: int, size: int = 64, seed: int = 0) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Image ``index`` (size, size, 3) uint8 and its label dict; a pure function of its arguments."""
    rng = np.random.default_rng([seed, SEED_STREAM, index])
    label = index % len(SHAPE_CLASSNAMES)
    colour, kind = COLOR_NAMES[label // len(KINDS)], KINDS[label % len(KINDS)]
    rgb = np.clip(np.asarray(COLORS[colour], dtype=np.float64) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3), 0, 255)
    frac = rng.uniform(*WIDTH_RANGE)
    width = frac * size
    spec: Dict[str, Any] = {"kind": kind, "width": width, "rotation": 0.0}
    if kind == "circle":
        spec.update(aspect=rng.uniform(0.85, 1.0), rotation=rng.uniform(0, 180))
        extent = width / 2
    elif kind == "square":
        spec.update(corner=rng.uniform(0.0, 0.3), rotation=rng.uniform(-40, 40))
        extent = width / 2 * math.sqrt(2)
    elif kind == "triangle":
        hr = rng.uniform(0.7, 1.25)
        spec.update(height_ratio=hr, rotation=rng.uniform(-40, 40) + (180.0 if rng.random() < 0.25 else 0.0))
        extent = math.hypot(width / 2, width * hr / 2)
    else:
        spec.update(inner_ratio=rng.uniform(0.36, 0.48), rotation=rng.uniform(0, 72))
        extent = width / 2
    lo, hi = extent + 1.0, size - extent - 1.0
    cx, cy = (rng.uniform(lo, hi, 2) if hi > lo else np.array([size / 2, size / 2]))
    spec["center"] = (float(cx), float(cy))
    style = STYLES[rng.choice(len(STYLES), p=STYLE_P)]
    border_rgb = rgb * 0.6
    bg_kind, img = _sample_background(rng, size, [rgb] + ([border_rgb] if style == "bordered" else []))
    sd = shape_distance(spec, size)
    if style == "outline":
        stroke = max(1.5, rng.uniform(0.10, 0.18) * width)
        cov = _coverage(np.abs(sd + stroke / 2) - stroke / 2)  # the stroke lies inside the outline
        img = img * (1 - cov[..., None]) + rgb * cov[..., None]
    else:
        cov = _coverage(sd)
        img = img * (1 - cov[..., None]) + rgb * cov[..., None]
        if style == "bordered":
            b = rng.uniform(1.0, 2.0)
            ring = _coverage(np.abs(sd + b / 2) - b / 2)
            img = img * (1 - ring[..., None]) + border_rgb * ring[..., None]
    blur = float(rng.uniform(*BLUR_SIGMA)) if rng.random() < BLUR_P else 0.0
    if blur:
        img = _gaussian_blur(img, blur)
    noise = float(rng.uniform(*NOISE_STD)) if rng.random() < NOISE_P else 0.0
    if noise:
        img = img + rng.normal(0.0, noise, img.shape)
    position = min(ANCHORS, key=lambda k: (ANCHORS[k][0] * size - cx) ** 2 + (ANCHORS[k][1] * size - cy) ** 2)
    meta = {"label": shape_label(colour, kind), "colour": colour, "kind": kind, "position": position,
            "size": "large" if frac > SIZE_SPLIT else "small", "width_frac": round(float(frac), 4),
            "rgb": [round(float(c), 1) for c in rgb], "style": style, "background": bg_kind,
            "blur": round(blur, 3), "noise": round(noise, 3), "rotation": round(float(spec["rotation"]), 2)}
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), meta


def render_alt(n: int, size: int = 64, seed: int = 0) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """``n`` labelled single-shape images: ((n, size, size, 3) uint8, list of label dicts with
    ``label`` (colour * 4 + kind), ``colour``, ``kind``, ``position``, ``size`` and the drawing
    choices: ``style``, ``background``, ``blur``, ``noise``, ``width_frac``, ``rotation``, ``rgb``).
    Labels cycle through the 32 classes, so any multiple of 32 images is balanced."""
    if n < 1:
        raise QLIPError(f"render_alt needs n >= 1 images, got {n}")
    if size < 32:
        raise QLIPError(f"render_alt needs size >= 32 px, got {size}")
    pairs = [render_one(i, size, seed) for i in range(n)]
    return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def write_alt_shards(out_dir: str, n: int = 320, size: int = 64, seed: int = 0, shard_size: int = 1000) -> List[str]:
    """Write ``n`` second-renderer images as labelled webdataset shards ``shapes-alt-NNNNNN.tar``
    (``{key}.png``, ``{key}.cls`` = colour * 4 + kind, ``{key}.json`` = the label dict), the
    layout of the generator's held-out split: ``qlip eval zero-shot --data DIR --classnames shapes``
    and the demo's ``evaluate`` read them. Returns the shard paths."""
    import io
    import json
    import os

    from PIL import Image

    from qlip.data.shapes import write_tar

    if shard_size < 1:
        raise QLIPError(f"shard size must be >= 1, got {shard_size}")
    images, labels = render_alt(n, size, seed)
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, n, shard_size)):
        samples = []
        for i in range(start, min(start + shard_size, n)):
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            samples.append((f"{i:09d}", {"png": buf.getvalue(), "cls": str(labels[i]["label"]).encode(),
                                         "json": json.dumps(labels[i], sort_keys=True).encode()}))
        paths.append(os.path.join(out_dir, f"shapes-alt-{shard:06d}.tar"))
        write_tar(paths[-1], samples)
    return paths


# ----------------------------------------------------------------------------------------------
# evaluation


def _fractions(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else float("nan")


@torch.no_grad()
def evaluate_alt(model, n: int = 320, seed: int = 0, size: int = 64, batch_size: int = 64,
                 judge: bool = True) -> Dict[str, Any]:
    """Zero-shot accuracy of ``model`` on ``n`` second-renderer images (prompts "a photo of a
    {colour} {kind}", the classifier of ``qlip.eval.zeroshot``, as the demo's ``evaluate``).

    Returns fractions: ``zero_shot_top1``, ``colour_acc``, ``kind_acc``; ``by_style``,
    ``by_background`` and ``by_size`` (each ``{"n", "zero_shot_top1", "colour_acc", "kind_acc"}``
    per value); with ``judge`` the
    non-learned shape judge's ``judge_colour_acc`` / ``judge_kind_acc`` on the same images (the
    judge was built for the first renderer's filled shapes: outlines are not in its model of a
    shape, see ``judge_kind_acc_fill`` for the filled images alone).
    """
    from PIL import Image

    from .zeroshot import zero_shot_classifier

    if getattr(model, "text", None) is None:
        raise QLIPError("evaluate_alt needs a model with a text tower (zero-shot classification)")
    model.eval()
    images, labels = render_alt(n, size, seed)
    y = np.array([m["label"] for m in labels])
    clf = zero_shot_classifier(model, list(SHAPE_CLASSNAMES), [PROMPT])
    preds = []
    for start in range(0, n, batch_size):
        x = model.preprocess([Image.fromarray(im) for im in images[start:start + batch_size]])
        preds.append((model.encode_image(x, normalize=True).float() @ clf).argmax(-1).cpu())
    pred = torch.cat(preds).numpy()
    k = len(KINDS)
    top1, colour, kind = pred == y, pred // k == y // k, pred % k == y % k
    out: Dict[str, Any] = {"n": n, "seed": seed, "size": size, "zero_shot_top1": _fractions(top1),
                           "colour_acc": _fractions(colour), "kind_acc": _fractions(kind)}
    for field, values in (("style", STYLES), ("background", BACKGROUNDS), ("size", ("small", "large"))):
        sel = np.array([m[field] for m in labels])
        out[f"by_{field}"] = {v: {"n": int((sel == v).sum()), "zero_shot_top1": _fractions(top1[sel == v]),
                                  "colour_acc": _fractions(colour[sel == v]), "kind_acc": _fractions(kind[sel == v])}
                              for v in values if (sel == v).any()}
    if judge:
        out.update(judge_alt(images, labels))
    return out


def judge_alt(images: np.ndarray, labels: List[Dict[str, Any]]) -> Dict[str, float]:
    """The shape judge's colour / kind accuracy on second-renderer images (all, and filled only)."""
    from .shape_judge import judge_shapes

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    judged = judge_shapes(x)
    colour = np.array([j["colour"] == m["colour"] for j, m in zip(judged, labels)])
    kind = np.array([j["kind"] == m["kind"] for j, m in zip(judged, labels)])
    fill = np.array([m["style"] == "fill" for m in labels])
    return {"judge_colour_acc": _fractions(colour), "judge_kind_acc": _fractions(kind),
            "judge_kind_acc_fill": _fractions(kind[fill])}


def pixel_colour(image: np.ndarray, threshold: float = 60.0) -> Optional[str]:
    """The palette colour most pixels of a (H, W, 3) image lie within ``threshold`` of (None if
    no pixel does): a check, used by the tests, that a label's colour is what the pixels show."""
    px = image.reshape(-1, 3).astype(np.float64)
    d = np.linalg.norm(px[:, None] - _PAL[None], axis=-1)
    near = d.argmin(-1)[d.min(-1) < threshold]
    if not len(near):
        return None
    return COLOR_NAMES[int(np.bincount(near, minlength=len(COLOR_NAMES)).argmax())]
