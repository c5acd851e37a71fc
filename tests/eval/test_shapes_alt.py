"""The second shape renderer (qlip.eval.shapes_alt): deterministic, balanced, labels that match the
pixels, backgrounds that keep the label unambiguous, and evaluate_alt's bookkeeping."""
import math

import numpy as np
import pytest
import torch

from qlip.data.shapes import COLOR_NAMES, SHAPE_CLASSNAMES, shape_label
from qlip.eval import shapes_alt as A


@pytest.fixture(scope="module")
def alt64():
    return A.render_alt(64, size=64, seed=0)


def test_deterministic_and_pure_per_index(alt64):
    images, labels = alt64
    again, labels2 = A.render_alt(8, size=64, seed=0)
    assert images.dtype == np.uint8 and images.shape == (64, 64, 64, 3)
    assert np.array_equal(again, images[:8]) and labels2 == labels[:8]
    img5, meta5 = A.render_one(5, size=64, seed=0)  # any image without the others
    assert np.array_equal(img5, images[5]) and meta5 == labels[5]
    other, _ = A.render_alt(8, size=64, seed=1)
    assert not np.array_equal(other, images[:8])


def test_balanced_over_the_32_classes(alt64):
    _, labels = alt64
    counts = np.bincount([m["label"] for m in labels], minlength=len(SHAPE_CLASSNAMES))
    assert counts.tolist() == [2] * 32
    for m in labels:
        assert m["label"] == shape_label(m["colour"], m["kind"])
        assert m["size"] == ("large" if m["width_frac"] > A.SIZE_SPLIT else "small")
    # the renderer's own variety is present in a small sample
    assert {m["style"] for m in labels} == set(A.STYLES)
    assert len({m["background"] for m in labels}) >= 5


def test_colour_label_is_what_the_pixels_show(alt64):
    images, labels = alt64
    voted = [A.pixel_colour(im) for im in images]
    assert np.mean([v == m["colour"] for v, m in zip(voted, labels)]) >= 0.95


def test_filled_shapes_have_the_labelled_kind():
    """The first renderer's judge (independent code) reads the filled shapes of this one."""
    images, labels = A.render_alt(48, size=64, seed=2)
    fill = [i for i, m in enumerate(labels) if m["style"] == "fill"]
    acc = A.judge_alt(images[fill], [labels[i] for i in fill])
    assert len(fill) >= 15 and acc["judge_kind_acc"] >= 0.9 and acc["judge_colour_acc"] >= 0.95, acc


@pytest.mark.parametrize("kind,params,area", [
    ("circle", {"aspect": 0.9}, math.pi * 10 * 9),
    ("square", {"corner": 0.3}, 20 * 20 - (4 - math.pi) * 3 ** 2),
    ("triangle", {"height_ratio": 1.2}, 0.5 * 20 * 24),
    ("star", {"inner_ratio": 0.4}, 5 * 10 * 4 * math.sin(math.radians(36))),
])
def test_signed_distance_covers_the_exact_area(kind, params, area):
    spec = {"kind": kind, "width": 20.0, "rotation": 17.0, "center": (31.3, 32.6), **params}
    sd = A.shape_distance(spec, 64)
    assert abs(A._coverage(sd).sum() - area) < 0.02 * area
    assert sd[32, 31] < 0 and sd[0, 0] > 0  # inside at the centre, outside in the corner


def test_backgrounds_stay_far_from_the_palette_and_the_shape():
    rng = np.random.default_rng(0)
    palette = np.array([A.COLORS[c] for c in COLOR_NAMES], dtype=np.float64)
    shape = np.array([35.0, 75.0, 225.0])
    for _ in range(12):
        kind, bg = A._sample_background(rng, 64, [shape])
        px = bg.reshape(-1, 3)
        assert np.linalg.norm(px[:, None] - palette[None], axis=-1).min() >= A.BG_PALETTE_DIST - 3
        assert np.linalg.norm(px - shape, axis=-1).min() >= A.BG_SHAPE_DIST - 3
    assert not A._colours_ok(np.array([[200.0, 40.0, 40.0]]), [shape])  # next to palette red
    assert not A._colours_ok(np.array([[150.0, 250.0, 0.0]]), [shape])  # far, but a yellow-green hue


class _OracleOfColour(torch.nn.Module):
    """Text: class c -> one-hot of its colour plus a small one-hot of its kind. Image: one-hot of
    the colour its pixels vote for, no kind. So it predicts the colour right (as far as the
    pixels show it) and always the first kind (circle)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.text = object()

    def tokenizer(self, prompts):
        return torch.tensor([SHAPE_CLASSNAMES.index(p[len("a photo of a "):]) for p in prompts])

    def encode_text(self, tokens, normalize=False):
        e = torch.zeros(len(tokens), 12)
        e[torch.arange(len(tokens)), tokens // 4] = 1.0
        e[torch.arange(len(tokens)), 8 + tokens % 4] = 0.1
        return torch.nn.functional.normalize(e, dim=-1)

    def preprocess(self, images):
        return torch.tensor([COLOR_NAMES.index(A.pixel_colour(np.asarray(im)) or "red") for im in images])

    def encode_image(self, x, normalize=False):
        e = torch.zeros(len(x), 12)
        e[torch.arange(len(x)), x] = 1.0
        return e


def test_evaluate_alt_bookkeeping(alt64):
    images, labels = alt64
    r = A.evaluate_alt(_OracleOfColour(), n=64, seed=0, batch_size=20, judge=False)
    colour = np.mean([A.pixel_colour(im) == m["colour"] for im, m in zip(images, labels)])
    assert r["n"] == 64 and r["colour_acc"] == pytest.approx(colour)
    assert r["kind_acc"] == 0.25  # always "circle", 16 circles in 64 balanced images
    circles = [A.pixel_colour(im) == m["colour"] for im, m in zip(images, labels) if m["kind"] == "circle"]
    assert r["zero_shot_top1"] == pytest.approx(sum(circles) / 64)
    assert sum(v["n"] for v in r["by_style"].values()) == 64
    assert sum(v["n"] for v in r["by_background"].values()) == 64
    assert {k: v["n"] for k, v in r["by_size"].items()} == {
        size: sum(m["size"] == size for m in labels) for size in ("small", "large")}
    outline = [A.pixel_colour(im) == m["colour"] for im, m in zip(images, labels) if m["style"] == "outline"]
    assert r["by_style"]["outline"]["colour_acc"] == pytest.approx(np.mean(outline))


def test_evaluate_alt_on_a_random_tiny_model(tiny_model):
    r = A.evaluate_alt(tiny_model, n=32, seed=3, judge=False)
    for key in ("zero_shot_top1", "colour_acc", "kind_acc"):
        assert 0.0 <= r[key] <= 1.0
    assert r["zero_shot_top1"] <= min(r["colour_acc"], r["kind_acc"])
    tiny_model.text = None
    with pytest.raises(A.QLIPError, match="text tower"):
        A.evaluate_alt(tiny_model, n=32)


def test_alt_shards_read_back_as_a_labelled_split(tmp_path, alt64):
    from qlip.data.evalsets import open_dataset
    images, labels = alt64
    paths = A.write_alt_shards(str(tmp_path), n=10, size=64, seed=0, shard_size=4)
    assert [p.rsplit("/", 1)[-1] for p in paths] == [f"shapes-alt-00000{i}.tar" for i in range(3)]
    got = list(open_dataset(str(tmp_path)).iter_pil())
    assert [y for _, y in got] == [m["label"] for m in labels[:10]]
    assert all(np.array_equal(np.asarray(im), images[i]) for i, (im, _) in enumerate(got))


def test_bad_arguments():
    with pytest.raises(A.QLIPError, match="n >= 1"):
        A.render_alt(0)
    with pytest.raises(A.QLIPError, match="32 px"):
        A.render_alt(4, size=16)
