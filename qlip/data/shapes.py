"""Synthetic captioned shapes: the embedded demo / test dataset.

Every training image shows one to three coloured shapes (circle, square, triangle, star; small or
large; left, right, top, bottom or center) on a solid, noisy or gradient background, with a
caption built from a small grammar ("a large red circle on the left and a small blue star at the
bottom"). A held-out split of single-shape images carries a (color, kind) label in 0..31 for
zero-shot classification with the prompts "a photo of a {color} {kind}".

Design notes (a prototype learned color perfectly but shape kind only at 30%):
- shapes are big (small ~ 0.24 * size, large ~ 0.44 * size, i.e. 15 / 28 px at 64x64) and drawn
  with 4x supersampling, so their outlines survive at the 8 px patch scale of a tiny ViT;
- a third of the multi-shape images have shapes of the SAME color and different kinds, so the
  caption can only be matched by looking at the kind; shapes barely overlap (< 4% of the area);
- backgrounds are kept far (RGB distance) from every palette color, so a background never reads
  as a shape and a shape never disappears into its background.

Every sample is a pure function of (seed, split, index): `make_sample` rebuilds any single sample
without the others, and the shards are byte-identical for the same settings.

    manifest = generate_shapes("data/shapes", n=20000, size=64, seed=0)
    manifest["train_shards"], manifest["val_shards"], manifest["heldout_shards"]   # lists of tar paths

Splits: ``train`` (captioned scenes), ``val`` (labelled single shapes, for choosing a recipe) and
``heldout`` (labelled single shapes, the test split, reported once), each from its own seed stream.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import tarfile
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from ..errors import DataError

# ----------------------------------------------------------------------------------------------
# vocabulary

# Canonical RGB of each color name. Shapes get a small per-channel jitter around it.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (35, 170, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 35),
    "purple": (140, 50, 185),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")

# Held-out classes: label = color_index * 4 + kind_index.
SHAPE_CLASSNAMES: tuple[str, ...] = tuple(f"{c} {k}" for c in COLOR_NAMES for k in KINDS)
SHAPE_PROMPT = "a photo of a {}"

FORMAT_VERSION = 3  # 2: hard-negative captions ({key}.neg.txt); 3: short captions, more single shapes
MANIFEST = "manifest.json"

# ----------------------------------------------------------------------------------------------
# geometry and color constants (fractions of the image size unless noted)

SIZE_FRAC = {"small": 0.24, "large": 0.44}  # shape width: 15.4 / 28.2 px (+-6%) at 64x64
SIZE_JITTER = 0.06                          # relative
ANCHORS = {"left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22),
           "bottom": (0.5, 0.78), "center": (0.5, 0.5)}
POS_JITTER = 0.04
MAX_ROTATION = 12.0                         # degrees, squares / triangles / stars
SUPERSAMPLE = 4
MAX_OVERLAP = 0.04                          # of the smaller shape's area
COLOR_JITTER = 12                           # per channel, uniform
BG_MIN_DIST = 80.0                          # every background pixel vs every palette color
BG_MIN_DIST_SHAPE = 110.0                   # ... and vs the colors of the shapes in the image
BG_MIN_HUE = 35.0                           # degrees from every chromatic palette hue, unless ...
BG_MAX_CHROMA = 50                          # ... the background pixel is this grey (max - min RGB)
SAME_COLOR_P = 0.35                         # multi-shape images with one color, different kinds
SAME_KIND_P = 0.15                          # multi-shape images with one kind, different colors
NUM_SHAPES_P = (0.5, 0.3, 0.2)              # one, two, three shapes
SHORT_CAPTION_P = 0.5                       # captions naming only colours and kinds (no size, position)

# Style "wide" (opt-in; `generate_shapes(style="wide")` applies it to the training split): a wider
# rendering of the same scenes, so that a model learns shapes rather than this renderer's pixels
# (docs/data.md, "Styles"). Its choices come from their own seed stream and are applied to the
# finished plain scene, so "plain" output is unchanged and a wide sample has the plain sample's
# colours, kinds, sizes, positions and caption wording.
SHAPE_STYLES: tuple[str, ...] = ("plain", "wide")
WIDE_SCALE = (0.82, 1.18)           # x diameter: small 0.19-0.30, large 0.34-0.55 of the image
WIDE_ROTATION = 40.0                # degrees, squares / triangles / stars
WIDE_ASPECT = (0.82, 1.0)           # circles become ellipses (minor / major axis), any angle
WIDE_CORNER = (0.0, 0.35)           # rounded squares: corner radius / half side
WIDE_TRIANGLE_HEIGHT = (0.7, 1.25)  # isosceles triangles: height / base (plain: equilateral, 0.87)
WIDE_STAR_INNER = (0.35, 0.55)      # star inner / outer radius (plain: 0.5)
WIDE_OUTLINE_P = 0.3                # shapes drawn as outlines only ...
WIDE_STROKE = (0.10, 0.20)          # ... with a stroke of this fraction of the diameter (>= 1.5 px)
WIDE_BACKGROUNDS = ("stripes", "checker", "radial")
WIDE_BG_P = 0.5                     # backgrounds replaced by one of WIDE_BACKGROUNDS
WIDE_BLUR_P, WIDE_BLUR = 0.3, (0.3, 1.1)    # Gaussian blur radius in px
WIDE_NOISE_P, WIDE_NOISE = 0.3, (2.0, 9.0)  # Gaussian pixel noise, std in 0..255 units
_STYLE_STREAM = 4000037

# Each split draws from its own seed stream (np.random.default_rng([seed, split id, index])):
# "val" images never coincide with "heldout" (test) or "train" images.
_SPLITS = {"train": 0, "heldout": 1, "val": 2}
LABELLED_SPLITS = ("heldout", "val")  # single-shape images with a (colour, kind) label


def caption_words(caption: str) -> list[str]:
    """A caption's words, lower-cased, with "," ":" "." as spaces: what the caption readers below match."""
    return caption.lower().replace(",", " ").replace(":", " ").replace(".", " ").split()


def caption_kinds(caption: str) -> list[str]:
    """The shape-kind words of a caption, in order ("a red circle and a blue star" -> circle, star)."""
    return [w for w in caption_words(caption) if w in KINDS]


def caption_colour_kind(caption: str) -> tuple[Optional[str], Optional[str]]:
    """(first colour word, first kind word) of a caption, None where there is none: how the downstream
    demos read a generated or a training caption ("two blue shapes: a star, and a square." -> blue, star)."""
    words = caption_words(caption)
    return (next((w for w in words if w in COLOR_NAMES), None), next((w for w in words if w in KINDS), None))


SINGLE_SHAPES = "single-shape captions"  # the filter's name in token shards' sources (qlip.data.tokens)


def single_shape_caption(caption: str) -> bool:
    """Whether a caption names exactly one shape, like the held-out test split's single shapes."""
    return len(caption_kinds(caption)) == 1


def shape_label(color: str, kind: str) -> int:
    """Held-out class index of a (color, kind) pair."""
    return COLOR_NAMES.index(color) * len(KINDS) + KINDS.index(kind)


def shape_prompts(template: str = SHAPE_PROMPT) -> list[str]:
    """One zero-shot prompt per held-out class, in label order ("a photo of a red circle", ...)."""
    return [template.format(name) for name in SHAPE_CLASSNAMES]


# ----------------------------------------------------------------------------------------------
# scene sampling


def _sample_rgb(rng: np.random.Generator, color: str) -> list[int]:
    base = np.array(COLORS[color])
    return np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255).tolist()


def _place(rng: np.random.Generator, position: str, size_name: str, size: int) -> tuple[list[float], float]:
    """Center (x, y) in pixels and width of a shape, kept inside the frame."""
    d = SIZE_FRAC[size_name] * size * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    ax, ay = ANCHORS[position]
    lo, hi = d / 2 + 1, size - d / 2 - 1
    x = float(np.clip((ax + rng.uniform(-POS_JITTER, POS_JITTER)) * size, lo, hi))
    y = float(np.clip((ay + rng.uniform(-POS_JITTER, POS_JITTER)) * size, lo, hi))
    return [round(x, 3), round(y, 3)], round(float(d), 3)


def _sample_shapes(rng: np.random.Generator, n: int, size: int) -> list[dict]:
    """Attributes of ``n`` shapes at distinct positions (no geometry checks yet)."""
    mode = "mixed"
    if n >= 2:
        u = rng.random()
        mode = "same_color" if u < SAME_COLOR_P else "same_kind" if u < SAME_COLOR_P + SAME_KIND_P else "mixed"
    positions = [POSITIONS[i] for i in rng.permutation(len(POSITIONS))[:n]]
    if mode == "same_color":
        # One color for all (two of three when n == 3), kinds all different: only the kind
        # tells the shapes apart.
        c = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
        colors = [c] * n
        if n == 3 and rng.random() < 0.5:
            colors[2] = COLOR_NAMES[rng.choice([i for i, x in enumerate(COLOR_NAMES) if x != c])]
        kinds = [KINDS[i] for i in rng.permutation(len(KINDS))[:n]]
    elif mode == "same_kind":
        k = KINDS[rng.integers(len(KINDS))]
        kinds = [k] * n
        colors = [COLOR_NAMES[i] for i in rng.permutation(len(COLOR_NAMES))[:n]]
    else:
        colors, kinds = [], []
        while len(colors) < n:  # independent draws, but no two identical (color, kind) pairs
            c, k = COLOR_NAMES[rng.integers(len(COLOR_NAMES))], KINDS[rng.integers(len(KINDS))]
            if (c, k) not in zip(colors, kinds):
                colors.append(c)
                kinds.append(k)
    shapes = []
    for c, k, p in zip(colors, kinds, positions):
        s = SIZES[rng.integers(len(SIZES))]
        center, d = _place(rng, p, s, size)
        rot = 0.0 if k == "circle" else round(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 3)
        shapes.append({"color": c, "kind": k, "size": s, "position": p, "rgb": _sample_rgb(rng, c),
                       "center": center, "diameter": d, "rotation": rot, "label": shape_label(c, k)})
    return shapes


def _shape_polygon(kind: str, cx: float, cy: float, d: float, rot_deg: float) -> list[tuple[float, float]]:
    """Outline of a square / triangle / star of width ~d centered at (cx, cy)."""
    if kind == "square":
        h = 0.88 * d / 2  # about the area of a circle of diameter d
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif kind == "triangle":
        r = 1.05 * d / math.sqrt(3)  # circumradius; width 1.05 d, pointing up
        pts = [(r * math.cos(math.radians(a)), -r * math.sin(math.radians(a))) for a in (90, 210, 330)]
        pts = [(x, y + 0.25 * r) for x, y in pts]  # center the bounding box, not the centroid
    elif kind == "star":
        pts = _star_points(0.55 * d, 0.55 * d * 0.5)  # fat star: arms stay visible at 15 px
    else:
        raise ValueError(f"no polygon for {kind!r}")
    return _rotate_about(pts, cx, cy, rot_deg)


def _star_points(r_out: float, r_in: float) -> list[tuple[float, float]]:
    """The 10 corners of a five-pointed star around the origin, first point up."""
    pts = []
    for i in range(10):
        r = r_out if i % 2 == 0 else r_in
        a = math.radians(90 + 36 * i)
        pts.append((r * math.cos(a), -r * math.sin(a)))
    return pts


def _rotate_about(pts: Sequence[tuple[float, float]], cx: float, cy: float, rot_deg: float) -> list[tuple[float, float]]:
    """``pts`` (around the origin) rotated by ``rot_deg`` and moved to (cx, cy)."""
    c, s = math.cos(math.radians(rot_deg)), math.sin(math.radians(rot_deg))
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def shape_coverage(shape: dict, size: int) -> np.ndarray:
    """Anti-aliased coverage (H, W) float32 in [0, 1] of one shape, drawn at 4x and box-filtered."""
    ss = SUPERSAMPLE
    mask = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(mask)
    (cx, cy), d = shape["center"], shape["diameter"]
    if "style" in shape:  # style "wide": other proportions, outlines
        pts = _wide_polygon(shape["kind"], cx * ss, cy * ss, d * ss, shape["rotation"], shape["style"])
        stroke = shape["style"]["outline"] * ss
        if stroke > 0:
            draw.line(pts + pts[:2], fill=255, width=max(1, round(stroke)), joint="curve")
        else:
            draw.polygon(pts, fill=255)
    elif shape["kind"] == "circle":
        draw.ellipse([(cx - d / 2) * ss, (cy - d / 2) * ss, (cx + d / 2) * ss, (cy + d / 2) * ss], fill=255)
    else:
        pts = _shape_polygon(shape["kind"], cx * ss, cy * ss, d * ss, shape["rotation"])
        draw.polygon(pts, fill=255)
    return np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _overlaps(coverages: Sequence[np.ndarray]) -> bool:
    for i in range(len(coverages)):
        for j in range(i + 1, len(coverages)):
            inter = float(np.minimum(coverages[i], coverages[j]).sum())
            if inter > MAX_OVERLAP * min(coverages[i].sum(), coverages[j].sum()):
                return True
    return False


def _sample_background(rng: np.random.Generator, size: int, shape_rgbs: Sequence[Sequence[int]]) -> dict:
    """A solid / noise / gradient background spec, far from the palette and the shapes' colors."""
    for _ in range(1000):
        kind = ("solid", "noise", "gradient")[rng.choice(3, p=[0.4, 0.4, 0.2])]
        colors = [rng.integers(0, 256, 3).tolist()]
        if kind == "gradient":
            colors.append(np.clip(np.array(colors[0]) + rng.integers(-70, 71, 3), 0, 255).tolist())
        bg = {"kind": kind, "colors": colors}
        if kind == "noise":
            bg.update(grid=int(rng.integers(3, 7)), amplitude=int(rng.integers(15, 36)),
                      noise_seed=int(rng.integers(2**31)))
        elif kind == "gradient":
            bg["angle"] = round(float(rng.uniform(0, 360)), 3)
        base = np.asarray(colors, dtype=np.uint8)
        if not _background_far(base, shape_rgbs):
            continue  # cheap rejection on the spec colors before rendering every pixel
        if kind == "solid" or _background_far(render_background(bg, size), shape_rgbs):
            return bg
    raise RuntimeError("could not find a background far from the shape colors")  # not reached in practice


def _background_far(pixels: np.ndarray, shape_rgbs: Sequence[Sequence[int]]) -> bool:
    """True if every pixel is far from every palette color (distance and hue) and from the shapes' colors."""
    return (_min_distance(pixels, list(COLORS.values())) >= BG_MIN_DIST and _hues_apart(pixels)
            and _min_distance(pixels, shape_rgbs) >= BG_MIN_DIST_SHAPE)


def _unique_rgb(pixels: np.ndarray) -> np.ndarray:
    """``np.unique(pixels.reshape(-1, 3), axis=0)`` (same rows, same lexicographic order) for
    uint8 pixels, via one 24-bit key per pixel: ~10x faster than the row-wise unique, which was
    three quarters of the data generation time."""
    flat = pixels.reshape(-1, 3)
    if flat.dtype != np.uint8:
        return np.unique(flat, axis=0)
    key = np.unique((flat[:, 0].astype(np.int32) << 16) | (flat[:, 1].astype(np.int32) << 8) | flat[:, 2])
    return np.stack([key >> 16, (key >> 8) & 255, key & 255], 1).astype(np.uint8)


def _min_distance(pixels: np.ndarray, colors: Sequence[Sequence[int]]) -> float:
    p = _unique_rgb(pixels).astype(np.float32)
    c = np.asarray(colors, dtype=np.float32)
    d2 = (p * p).sum(1)[:, None] - 2 * p @ c.T + (c * c).sum(1)[None, :]
    return float(np.sqrt(max(d2.min(), 0.0)))


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hue in degrees and chroma (max - min) of (..., 3) RGB values."""
    rgb = rgb.astype(np.float32)
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    c = np.maximum(chroma, 1e-6)
    hue = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4)) * 60.0
    return hue, chroma


_PALETTE_HUES = [float(h) for h, c in zip(*_hue_chroma(np.array(list(COLORS.values())))) if c > 100]


def _hues_apart(pixels: np.ndarray) -> bool:
    """True if every pixel is greyish or at least BG_MIN_HUE degrees from every palette hue.

    RGB distance alone lets a bright green background pass next to a green shape; the hue rule
    keeps saturated backgrounds to hues no color name covers (teal, cyan, magenta, pink, lime).
    """
    hue, chroma = _hue_chroma(pixels.reshape(-1, 3))
    for h in _PALETTE_HUES:
        d = np.abs(hue - h) % 360
        if np.any((np.minimum(d, 360 - d) < BG_MIN_HUE) & (chroma >= BG_MAX_CHROMA)):
            return False
    return True


def render_background(bg: dict, size: int) -> np.ndarray:
    """(size, size, 3) uint8 background from its spec (as stored in the sample's json)."""
    c0 = np.asarray(bg["colors"][0], dtype=np.float32)
    if bg["kind"] == "solid":
        img = np.broadcast_to(c0, (size, size, 3))
    elif bg["kind"] == "noise":
        # Low-frequency color noise: a tiny random grid upsampled bicubically, plus faint grain.
        nrng = np.random.default_rng(bg["noise_seed"])
        g, a = bg["grid"], bg["amplitude"]
        grid = np.clip(c0 + nrng.uniform(-a, a, (g, g, 3)), 0, 255).astype(np.uint8)
        img = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), dtype=np.float32)
        img = img + nrng.uniform(-4, 4, (size, size, 3))
    elif bg["kind"] == "gradient":
        c1 = np.asarray(bg["colors"][1], dtype=np.float32)
        t = np.linspace(-1, 1, size, dtype=np.float32)
        a = math.radians(bg["angle"])
        proj = (np.cos(a) * t[None, :] + np.sin(a) * t[:, None]) / math.sqrt(2) * 0.5 + 0.5
        img = c0 * (1 - proj[..., None]) + c1 * proj[..., None]
    elif bg["kind"] in WIDE_BACKGROUNDS:  # style "wide" only: c0 -> c1 along a pattern t in [0, 1]
        c1 = np.asarray(bg["colors"][1], dtype=np.float32)
        t = _wide_pattern(bg, size)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    else:
        raise DataError(f"unknown background kind {bg['kind']!r}")
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def sample_scene(rng: np.random.Generator, size: int = 64, num_shapes: Optional[int] = None) -> dict:
    """Random scene spec: {"size", "shapes": [...], "background": {...}} (json-serialisable)."""
    n = int(rng.choice(3, p=NUM_SHAPES_P)) + 1 if num_shapes is None else num_shapes
    for _ in range(200):
        shapes = _sample_shapes(rng, n, size)
        if n == 1 or not _overlaps([shape_coverage(s, size) for s in shapes]):
            break
    else:
        shapes = shapes[:1]  # pathological case: keep a single shape
    return {"size": size, "shapes": shapes, "background": _sample_background(rng, size, [s["rgb"] for s in shapes])}


def render_scene(scene: dict) -> Image.Image:
    """Draw a scene spec: background, then each shape alpha-blended with its anti-aliased coverage."""
    size = scene["size"]
    img = render_background(scene["background"], size).astype(np.float32)
    for s in scene["shapes"]:
        a = shape_coverage(s, size)[..., None]
        img = img * (1 - a) + np.asarray(s["rgb"], dtype=np.float32) * a
    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8))
    return _apply_effects(out, scene["effects"]) if "effects" in scene else out


# ----------------------------------------------------------------------------------------------
# style "wide"


def _lerp(bounds: tuple[float, float], u: float) -> float:
    return bounds[0] + (bounds[1] - bounds[0]) * float(u)


def _wide_polygon(kind: str, cx: float, cy: float, d: float, rot_deg: float, style: dict) -> list[tuple[float, float]]:
    """Outline of a wide-style shape of width ~d centered at (cx, cy): an ellipse, a rounded
    square, an isosceles triangle or a star with another inner radius (``style`` holds them)."""
    if kind == "circle":
        a, b = d / 2, d / 2 * style["aspect"]
        pts = [(a * math.cos(t), b * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif kind == "square":
        h = 0.88 * d / 2
        r = style["corner"] * h
        pts = []
        for qx, qy, start in ((1, 1, 0), (-1, 1, 90), (-1, -1, 180), (1, -1, 270)):  # corner arcs, clockwise on screen
            for t in np.linspace(start, start + 90, 6):
                pts.append((qx * (h - r) + r * math.cos(math.radians(t)), qy * (h - r) + r * math.sin(math.radians(t))))
    elif kind == "triangle":
        base = 1.05 * d
        height = base * style["height"]
        pts = [(0.0, -height / 2), (base / 2, height / 2), (-base / 2, height / 2)]
    elif kind == "star":
        r_out = 0.55 * d
        pts = _star_points(r_out, r_out * style["inner"])
    else:
        raise ValueError(f"no polygon for {kind!r}")
    return _rotate_about(pts, cx, cy, rot_deg)


def _wide_pattern(bg: dict, size: int) -> np.ndarray:
    """(size, size) float32 pattern in [0, 1] of a stripes / checker / radial background spec."""
    yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size
    if bg["kind"] == "stripes":
        a = math.radians(bg["angle"])
        phase = 2 * math.pi * (math.cos(a) * xx + math.sin(a) * yy) / bg["period"]
        return (np.sin(phase) > 0).astype(np.float32) if bg["hard"] else 0.5 + 0.5 * np.sin(phase)
    if bg["kind"] == "checker":
        return ((np.floor(xx / bg["cell"]) + np.floor(yy / bg["cell"])) % 2).astype(np.float32)
    if bg["kind"] == "radial":
        (ox, oy), r = bg["origin"], bg["radius"]
        return np.clip(np.hypot(xx - ox, yy - oy) / r, 0, 1).astype(np.float32)
    raise DataError(f"unknown background kind {bg['kind']!r}")


def _sample_wide_background(rng: np.random.Generator, size: int, shape_rgbs: Sequence[Sequence[int]]) -> Optional[dict]:
    """A stripes / checker / radial background spec as far from the palette and the shapes as the
    plain ones (`_background_far`), or None if none was found in 200 tries (keep the plain one)."""
    for _ in range(200):
        kind = WIDE_BACKGROUNDS[rng.integers(len(WIDE_BACKGROUNDS))]
        c0 = rng.integers(0, 256, 3)
        if not _background_far(c0[None].astype(np.uint8), shape_rgbs):
            continue  # one colour at a time: far fewer draws than rejecting both together
        for _ in range(20):
            c1 = np.clip(c0 + rng.integers(-90, 91, 3), 0, 255)
            if _background_far(c1[None].astype(np.uint8), shape_rgbs):
                break
        colors = [c0.tolist(), c1.tolist()]
        bg: dict = {"kind": kind, "colors": colors}
        if kind == "stripes":
            bg.update(angle=round(float(rng.uniform(0, 180)), 3), period=round(float(rng.uniform(0.08, 0.22)), 4),
                      hard=bool(rng.random() < 0.5))
        elif kind == "checker":
            bg["cell"] = round(float(rng.uniform(0.07, 0.2)), 4)
        else:
            bg.update(origin=[round(float(v), 4) for v in rng.uniform(0.2, 0.8, 2)],
                      radius=round(float(rng.uniform(0.5, 0.9)), 4))
        if _background_far(np.asarray(colors, dtype=np.uint8), shape_rgbs) and \
                _background_far(render_background(bg, size), shape_rgbs):
            return bg
    return None


def widen_scene(scene: dict, rng: np.random.Generator) -> dict:
    """The scene in style "wide": per shape a scale (``WIDE_SCALE``), a rotation up to
    ``WIDE_ROTATION``, other proportions (ellipse, rounded square, isosceles triangle, star inner
    radius) and outline-or-fill; per image maybe a stripes / checker / radial background, a blur
    and pixel noise. Colours, kinds, size and position names stay those of the plain scene (and so
    does the caption). Every shape takes the same number of draws from ``rng``, so the variants of
    a kind group (same ``rng``) get the same choices. If the new geometry makes shapes overlap
    (``MAX_OVERLAP``, drawn or filled: an outline must not hold another shape), the first of these
    that does not is kept: the shapes no larger than the plain ones at the plain centres, the plain
    geometry with the outlines, the plain shapes (background and effects still apply)."""
    size = scene["size"]
    shapes, smaller, plain_geometry = [], [], []
    for s in scene["shapes"]:
        u = rng.random(9)
        style = {"aspect": round(_lerp(WIDE_ASPECT, u[0]), 4), "corner": round(_lerp(WIDE_CORNER, u[1]), 4),
                 "height": round(_lerp(WIDE_TRIANGLE_HEIGHT, u[2]), 4), "inner": round(_lerp(WIDE_STAR_INNER, u[3]), 4),
                 "outline": 0.0}
        d = s["diameter"] * _lerp(WIDE_SCALE, u[4])
        if u[5] < WIDE_OUTLINE_P:
            style["outline"] = round(max(1.5, _lerp(WIDE_STROKE, u[6]) * d), 3)
        rot = 180.0 * u[7] if s["kind"] == "circle" else _lerp((-WIDE_ROTATION, WIDE_ROTATION), u[7])
        lo, hi = 0.6 * d + 1, size - 0.6 * d - 1  # a star's points reach 0.55 d from its center
        center = [round(float(np.clip(v, lo, hi)), 3) if lo < hi else size / 2 for v in s["center"]]
        shapes.append({**s, "center": center, "diameter": round(float(d), 3), "rotation": round(float(rot), 3),
                       "style": style})
        smaller.append({**shapes[-1], "center": s["center"], "diameter": round(float(min(d, s["diameter"])), 3)})
        plain_geometry.append({**s, "style": {**_PLAIN_PROPORTIONS, "outline": style["outline"]}})
    if len(shapes) > 1:
        # the first geometry whose drawn pixels do not overlap and whose outlines hold no other shape
        for shapes in (shapes, smaller, plain_geometry, list(scene["shapes"])):
            filled = [{**x, "style": {**x["style"], "outline": 0.0}} if "style" in x else x for x in shapes]
            if not _overlaps([shape_coverage(x, size) for x in shapes]) and \
                    not _overlaps([shape_coverage(x, size) for x in filled]):
                break
    bg = scene["background"]
    if rng.random() < WIDE_BG_P:
        bg = _sample_wide_background(rng, size, [x["rgb"] for x in shapes]) or bg
    u = rng.random(4)
    effects = {"blur": round(_lerp(WIDE_BLUR, u[1]), 3) if u[0] < WIDE_BLUR_P else 0.0,
               "noise": round(_lerp(WIDE_NOISE, u[3]), 3) if u[2] < WIDE_NOISE_P else 0.0,
               "noise_seed": int(rng.integers(2**31))}
    return {**scene, "shapes": shapes, "background": bg, "effects": effects, "style": "wide"}


# proportions under which the wide polygons equal the plain shapes (a circle is an ellipse of aspect 1)
_PLAIN_PROPORTIONS = {"aspect": 1.0, "corner": 0.0, "height": math.sqrt(3) / 2, "inner": 0.5}


def _apply_effects(img: Image.Image, effects: dict) -> Image.Image:
    """Style "wide": Gaussian blur (PIL, radius in px), then Gaussian pixel noise from its own seed."""
    if effects["blur"] > 0:
        img = img.filter(ImageFilter.GaussianBlur(effects["blur"]))
    if effects["noise"] > 0:
        x = np.asarray(img, dtype=np.float32)
        x = x + np.random.default_rng(effects["noise_seed"]).normal(0.0, effects["noise"], x.shape).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))
    return img


# ----------------------------------------------------------------------------------------------
# caption grammar

_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
_POS_PHRASES = {
    "left": ("on the left", "on the left side", "at the left"),
    "right": ("on the right", "on the right side", "at the right"),
    "top": ("at the top", "near the top", "at the top"),
    "bottom": ("at the bottom", "near the bottom", "at the bottom"),
    "center": ("in the center", "in the middle", "in the center"),
}
_BG_WORDS = {"solid": ("plain", "solid"), "noise": ("textured", "noisy"), "gradient": ("gradient", "shaded"),
             "stripes": ("striped", "stripy"), "checker": ("checkered", "chequered"), "radial": ("gradient", "shaded")}
_NUMBER_WORDS = {2: "two", 3: "three"}
_FRAMES = ("{}", "{}", "there is {}", "a photo of {}", "an image of {}", "a picture showing {}")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[rng.integers(len(options))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _shape_phrase(rng: np.random.Generator, s: dict, with_color: bool = True, short: bool = False) -> str:
    """ "a large red circle on the left" (size word omitted 15% of the time); ``short``: "a red circle"."""
    if short:
        return _article(" ".join(([s["color"]] if with_color else []) + [s["kind"]]))
    words = [] if rng.random() < 0.15 else [_pick(rng, _SIZE_WORDS[s["size"]])]
    words += [s["color"]] if with_color else []
    words.append(s["kind"])
    return f"{_article(' '.join(words))} {_pick(rng, _POS_PHRASES[s['position']])}"


def _join(rng: np.random.Generator, parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return f"{parts[0]} {_pick(rng, ('and', 'and', 'with'))} {parts[1]}"
    return ", ".join(parts[:-1]) + _pick(rng, (" and ", ", and ")) + parts[-1]


def caption_scene(scene: dict, rng: np.random.Generator) -> str:
    """Caption naming every shape's color and kind, and, unless it is a *short* caption
    (``SHORT_CAPTION_P``), every shape's position and usually its size.

    Forms: "[frame] a large red circle on the left and a small blue star at the bottom
    [on a plain background]", "two shapes: ...", and for same-colored shapes
    "two red shapes: a large circle on the left and a small star at the bottom"; short:
    "a red circle and a blue star". Short captions take away the size and position shortcuts: a
    contrastive model that matches them beyond colour must look at the shapes' kinds
    (docs/demo.md measured this).
    """
    short = bool(rng.random() < SHORT_CAPTION_P)
    shapes = [scene["shapes"][i] for i in rng.permutation(len(scene["shapes"]))]
    n = len(shapes)
    one_color = n >= 2 and len({s["color"] for s in shapes}) == 1
    if one_color and rng.random() < 0.5:
        body = _join(rng, [_shape_phrase(rng, s, with_color=False, short=short) for s in shapes])
        text = f"{_NUMBER_WORDS[n]} {shapes[0]['color']} shapes: {body}"
    else:
        body = _join(rng, [_shape_phrase(rng, s, short=short) for s in shapes])
        if n >= 2 and rng.random() < 0.2:
            text = f"{_NUMBER_WORDS[n]} shapes: {body}"
        else:
            text = _pick(rng, _FRAMES).format(body)
    if rng.random() < 0.2:
        text += f" on a {_pick(rng, _BG_WORDS[scene['background']['kind']])} background"
    return text


# ----------------------------------------------------------------------------------------------
# samples and shards


def _kind_variant(scene: dict, v: int, rng: np.random.Generator) -> dict:
    """The scene with every shape's kind shifted by ``v`` (mod 4): same colours, sizes, positions
    and background; variants 0..3 of a group show four different kinds at every position."""
    shapes = []
    for s in scene["shapes"]:
        kind = KINDS[(KINDS.index(s["kind"]) + v) % len(KINDS)]
        rot = 0.0 if kind == "circle" else (s["rotation"] or round(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 3))
        shapes.append({**s, "kind": kind, "rotation": rot, "label": shape_label(s["color"], kind)})
    return {**scene, "shapes": shapes}


def make_sample(index: int, size: int = 64, seed: int = 0, split: str = "train",
                group: int = 1, style: str = "plain") -> tuple[Image.Image, str, dict]:
    """Sample ``index`` of a split: (RGB image, caption, metadata). A pure function of its arguments.

    Held-out (test) and validation samples have one shape whose class cycles through the 32
    labels (balanced); their metadata has "label", "color" and "kind" at the top level. The two
    splits use different seed streams.

    ``group`` > 1 (training split): consecutive samples ``g*group .. g*group+group-1`` are *kind
    groups*, the same scene (colours, sizes, positions, background, caption wording) with the
    shapes' kinds cycled, so a batch made of whole groups holds, for every caption, captions that
    differ from it only in the kind words: colour alone cannot pair images and captions.

    ``style="wide"`` draws the same scene (same colours, kinds, sizes, positions, caption wording)
    with wider rendering choices (`widen_scene`); ``"plain"`` is the generator's original output.
    """
    if style not in SHAPE_STYLES:
        raise DataError(f"unknown shapes style {style!r} (expected one of {', '.join(SHAPE_STYLES)})")
    if split not in _SPLITS:
        raise DataError(f"unknown shapes split {split!r} (expected one of {sorted(_SPLITS)})")
    if not 1 <= group <= len(KINDS):
        raise DataError(f"kind group size must be in 1..{len(KINDS)}, got {group}")
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    if split == "train" and group > 1:
        g, v = divmod(index, group)
        base_rng = np.random.default_rng([seed, _SPLITS[split], g, 1000003])
        scene = _kind_variant(sample_scene(base_rng, size), v, rng)
        rng = np.random.default_rng([seed, _SPLITS[split], g, 2000003])  # same caption wording in a group
    elif split == "train":
        scene = sample_scene(rng, size)
    else:
        label = index % len(SHAPE_CLASSNAMES)
        color, kind = COLOR_NAMES[label // len(KINDS)], KINDS[label % len(KINDS)]
        s_name, pos = SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))]
        center, d = _place(rng, pos, s_name, size)
        rot = 0.0 if kind == "circle" else round(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 3)
        shape = {"color": color, "kind": kind, "size": s_name, "position": pos, "rgb": _sample_rgb(rng, color),
                 "center": center, "diameter": d, "rotation": rot, "label": label}
        scene = {"size": size, "shapes": [shape], "background": _sample_background(rng, size, [shape["rgb"]])}
    if style == "wide":  # its own seed stream (per kind group), so the plain draws are untouched
        stream = index // group if split == "train" and group > 1 else index
        scene = widen_scene(scene, np.random.default_rng([seed, _SPLITS[split], stream, _STYLE_STREAM]))
    wording = copy.deepcopy(rng)  # the hard negative uses the caption's exact wording
    caption = caption_scene(scene, rng)
    meta = {"key": f"{index:09d}", "split": split, "caption": caption, **scene}
    if split == "train":
        # hard-negative caption: the same scene and wording with every shape's kind shifted, so it
        # differs from the caption only in the kind words (NegCLIP-style negative)
        shift = int(np.random.default_rng([seed, _SPLITS[split], index, 3000017]).integers(1, len(KINDS)))
        meta["negative_caption"] = caption_scene(_kind_variant(scene, shift, rng), wording)
    if split in LABELLED_SPLITS:
        meta.update(label=scene["shapes"][0]["label"], color=scene["shapes"][0]["color"],
                    kind=scene["shapes"][0]["kind"])
    return render_scene(scene), caption, meta


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _encode_sample(index: int, size: int, seed: int, split: str, group: int = 1,
                   style: str = "plain") -> tuple[str, dict[str, bytes]]:
    img, caption, meta = make_sample(index, size, seed, split, group if split == "train" else 1, style)
    fields = {"png": _png_bytes(img), "txt": caption.encode(), "json": json.dumps(meta, sort_keys=True).encode()}
    if "negative_caption" in meta:
        fields["neg.txt"] = meta["negative_caption"].encode()
    if split in LABELLED_SPLITS:
        fields["cls"] = str(meta["label"]).encode()
    return meta["key"], fields


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write (key, {ext: bytes}) samples as a webdataset shard with fixed headers (byte-reproducible).

    The shard is written to ``path + ".tmp"`` and renamed, so a reader never sees half a shard.
    Returns the number of samples written.
    """
    count = 0
    with tarfile.open(path + ".tmp", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
            count += 1
    os.replace(path + ".tmp", path)
    return count


def _write_shard(args: tuple) -> tuple[str, int]:
    out_dir, split, shard, start, stop, size, seed, group, style = args
    name = f"shapes-{split}-{shard:06d}.tar"
    count = write_tar(os.path.join(out_dir, name),
                      (_encode_sample(i, size, seed, split, group, style) for i in range(start, stop)))
    return name, count


def _write_splits(out_dir: str, splits: Sequence[tuple], size: int, seed: int, shard_size: int, progress: bool,
                  workers: int = 1) -> dict[str, list[str]]:
    """Write the shards of ``splits`` (``(split, n, group, style)`` each); returns ``{split: shard names}``.
    With ``workers > 1`` all splits' shards are rendered by one pool of processes (one start-up, and
    the small validation / test shards fill the end of the training ones); every sample is a pure
    function of its index, so the bytes do not depend on ``workers``."""
    jobs = [(out_dir, split, shard, start, min(start + shard_size, n), size, seed, group, style)
            for split, n, group, style in splits for shard, start in enumerate(range(0, n, shard_size))]
    names: dict[str, list[str]] = {split: [] for split, *_ in splits}
    what = "/".join(split for split, n, *_ in splits if n)
    with tqdm(total=sum(n for _, n, *_ in splits), desc=f"shapes {what}", unit="img", disable=not progress) as bar:
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
                for job, (name, count) in zip(jobs, pool.imap(_write_shard, jobs)):
                    names[job[1]].append(name)
                    bar.update(count)
        else:
            for job in jobs:
                name, count = _write_shard(job)
                names[job[1]].append(name)
                bar.update(count)
    return names


def generate_heldout(out_dir: str, n: int, size: int = 64, seed: int = 0, shard_size: int = 1000,
                     progress: bool = True) -> list[str]:
    """Write the labelled held-out split (single shapes, ``{key}.cls`` = color*4 + kind, balanced
    over the 32 classes) as ``shapes-heldout-*.tar`` in ``out_dir``. Returns the shard paths."""
    _check_settings(n, size, shard_size, allow_zero=True)
    os.makedirs(out_dir, exist_ok=True)
    names = _write_splits(out_dir, [("heldout", n, 1, "plain")], size, seed, shard_size, progress)["heldout"]
    return [os.path.join(out_dir, x) for x in names]


def _check_settings(n: int, size: int, shard_size: int, allow_zero: bool = False) -> None:
    if n < (0 if allow_zero else 1):
        raise DataError(f"number of images must be {'>= 0' if allow_zero else '>= 1'}, got {n}")
    if size < 32:
        raise DataError(f"shapes image size must be >= 32 px, got {size}")
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")


def read_manifest(out_dir: str) -> Optional[dict]:
    """The manifest of a generated shapes directory (shard paths made absolute), or None if absent."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable shapes manifest ({e})") from None
    root = os.path.abspath(out_dir)
    manifest["train_shards"] = [os.path.join(root, x) for x in manifest.get("train", [])]
    manifest["heldout_shards"] = [os.path.join(root, x) for x in manifest.get("heldout", [])]
    manifest["val_shards"] = [os.path.join(root, x) for x in manifest.get("val", [])]
    return manifest


def _settings(n: int, size: int, seed: int, shard_size: int, heldout_n: int, group: int = 1, val_n: int = 0,
              style: str = "plain") -> dict:
    out = {"format": "qlip-shapes", "version": FORMAT_VERSION, "n": n, "heldout_n": heldout_n, "val_n": val_n,
           "size": size, "seed": seed, "shard_size": shard_size, "group": group}
    if style != "plain":  # a plain manifest stays what it was before styles existed
        out["style"] = style
    return out


def generate_shapes(out_dir: str, n: int, size: int = 64, seed: int = 0, shard_size: int = 1000,
                    heldout_n: int = 320, overwrite: bool = False, progress: bool = True, workers: int = 1,
                    group: int = 1, val_n: int = 0, style: str = "plain") -> dict:
    """Write ``n`` captioned training images, ``val_n`` labelled validation images and
    ``heldout_n`` labelled held-out (test) images as shards.

    ``style`` ("plain" or "wide", see `widen_scene`) is the training images' rendering; the
    labelled validation and test images are always plain, byte-identical to a plain run's, so
    their accuracies stay comparable (robustness to other renderings: ``qlip.eval.shapes_alt``).

    Files in ``out_dir``: ``shapes-train-NNNNNN.tar`` (``{key}.png``, ``{key}.txt``, ``{key}.json``),
    ``shapes-val-NNNNNN.tar`` and ``shapes-heldout-NNNNNN.tar`` (the same plus ``{key}.cls``;
    validation and test come from different seed streams) and ``manifest.json`` (written
    last: its presence means the data is complete). If a manifest with the same settings and all
    its shards already exist, nothing is written. A manifest with other settings is an error
    unless ``overwrite``. Returns the manifest (see `read_manifest`).
    """
    _check_settings(n, size, shard_size)
    _check_settings(heldout_n, size, shard_size, allow_zero=True)
    _check_settings(val_n, size, shard_size, allow_zero=True)
    if not 1 <= group <= len(KINDS):
        raise DataError(f"kind group size must be in 1..{len(KINDS)}, got {group}")
    if group > 1 and (shard_size % group or n % group):
        raise DataError(f"with kind groups of {group}, n ({n}) and shard_size ({shard_size}) must be multiples "
                        f"of {group} so that no group is split across shards")
    if style not in SHAPE_STYLES:
        raise DataError(f"unknown shapes style {style!r} (expected one of {', '.join(SHAPE_STYLES)})")
    want = _settings(n, size, seed, shard_size, heldout_n, group, val_n, style)
    have = read_manifest(out_dir)
    if have is not None:
        have.setdefault("val_n", 0)  # manifests from before the validation split
        want_style = {**want, "style": style}
        have_style = {**have, "style": have.get("style", "plain")}  # plain manifests name no style
        same = all(have_style.get(k) == v for k, v in want_style.items())
        if same and all(os.path.exists(p) for p in have["train_shards"] + have["heldout_shards"] + have["val_shards"]):
            return have
        if not same and not overwrite:
            diff = ", ".join(f"{k}={have_style.get(k)} (asked {v})" for k, v in want_style.items()
                             if have_style.get(k) != v)
            raise DataError(f"{out_dir} holds shapes data with other settings: {diff}; "
                            "use overwrite=True / --overwrite to replace it")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # stale shards from other settings or an interrupted run
        if name == MANIFEST or (name.startswith("shapes-") and (name.endswith(".tar") or name.endswith(".tmp"))):
            os.remove(os.path.join(out_dir, name))
    written = _write_splits(out_dir, [("train", n, group, style), ("heldout", heldout_n, 1, "plain"),
                                      ("val", val_n, 1, "plain")], size, seed, shard_size, progress, workers)
    train, heldout, val = written["train"], written["heldout"], written["val"]
    manifest = {**want, "train": train, "val": val, "heldout": heldout, "classnames": list(SHAPE_CLASSNAMES),
                "prompt": SHAPE_PROMPT}
    with open(os.path.join(out_dir, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(out_dir, MANIFEST + ".tmp"), os.path.join(out_dir, MANIFEST))
    return read_manifest(out_dir)
