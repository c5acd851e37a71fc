"""The shapes generator's opt-in style "wide": the plain output is untouched, a wide sample is the
same scene (same caption) drawn more widely, its json re-renders it, and the labelled splits stay plain."""
import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from qlip.data import shapes as S
from qlip.errors import DataError

_BG_SUFFIX = re.compile(r" on a \w+ background$")


def read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.fixture(scope="module")
def pairs():
    """(plain, wide) make_sample outputs of 40 training images."""
    return [(S.make_sample(i, 64, seed=2), S.make_sample(i, 64, seed=2, style="wide")) for i in range(40)]


def test_wide_is_the_same_scene_drawn_otherwise(pairs):
    differ = 0
    for (img_p, cap_p, meta_p), (img_w, cap_w, meta_w) in pairs:
        assert "style" not in meta_p and "effects" not in meta_p and meta_w["style"] == "wide"
        # same caption wording (the background word may name a new background kind)
        assert _BG_SUFFIX.sub("", cap_w) == _BG_SUFFIX.sub("", cap_p)
        assert _BG_SUFFIX.sub("", meta_w["negative_caption"]) == _BG_SUFFIX.sub("", meta_p["negative_caption"])
        names = [(s["color"], s["kind"], s["size"], s["position"], s["rgb"]) for s in meta_p["shapes"]]
        assert names == [(s["color"], s["kind"], s["size"], s["position"], s["rgb"]) for s in meta_w["shapes"]]
        same = np.array_equal(np.asarray(img_p), np.asarray(img_w))
        assert not (same and len(meta_p["shapes"]) == 1)  # a single shape is always restyled
        differ += not same
    # several shapes may fall back to the plain geometry (overlaps), rarely with nothing else changed
    assert differ >= 0.9 * len(pairs)


def test_plain_is_the_default_and_unchanged(pairs):
    img, cap, meta = S.make_sample(7, 64, seed=2, style="plain")
    (img_d, cap_d, meta_d), _ = pairs[7]
    assert np.array_equal(np.asarray(img), np.asarray(img_d)) and (cap, meta) == (cap_d, meta_d)
    # the plain image is exactly render_scene of its plain spec: no style key reached the drawing
    assert np.array_equal(np.asarray(S.render_scene(meta)), np.asarray(img))


def test_wide_json_re_renders_the_image(pairs):
    for _, (img, _, meta) in pairs[:12]:
        assert np.array_equal(np.asarray(S.render_scene(json.loads(json.dumps(meta)))), np.asarray(img))


def test_wide_variety_and_names_stay_true(pairs):
    metas = [m for _, (_, _, m) in pairs]
    shapes = [s for m in metas for s in m["shapes"]]
    assert any(s["style"]["outline"] > 0 for s in shapes) and any(s["style"]["outline"] == 0 for s in shapes)
    assert any(m["background"]["kind"] in S.WIDE_BACKGROUNDS for m in metas)
    assert any(m["effects"]["blur"] > 0 for m in metas) and any(m["effects"]["noise"] > 0 for m in metas)
    assert any(abs(s["rotation"]) > S.MAX_ROTATION for s in shapes if s["kind"] != "circle")
    split = np.sqrt(S.SIZE_FRAC["small"] * S.SIZE_FRAC["large"])
    for s in shapes:  # "small" / "large" in the caption still tell the sizes apart
        assert (s["diameter"] / 64 < split) == (s["size"] == "small")
    for m in metas:  # new backgrounds are as far from the palette and the shapes as the plain ones
        if m["background"]["kind"] in S.WIDE_BACKGROUNDS:
            assert S._background_far(S.render_background(m["background"], 64), [s["rgb"] for s in m["shapes"]])


def test_wide_kind_groups_share_every_choice():
    plain = {**S._PLAIN_PROPORTIONS}
    compared = 0
    for g in range(4):
        metas = [S.make_sample(i, 64, seed=1, group=4, style="wide")[2] for i in range(4 * g, 4 * g + 4)]
        assert len({json.dumps(m["background"]) for m in metas}) == 1
        assert len({json.dumps(m["effects"]) for m in metas}) == 1
        assert len({tuple(s["kind"] for s in m["shapes"]) for m in metas}) == 4
        # the per-shape choices too, except in a variant whose new shapes would overlap (it falls
        # back to the plain proportions)
        styled = [m for m in metas if all("style" in s and {**s["style"], "outline": 0.0} != {**plain, "outline": 0.0}
                                          for s in m["shapes"])]
        assert len({json.dumps([s["style"] for s in m["shapes"]]) for m in styled}) <= 1
        compared += len(styled) >= 2
    assert compared >= 2


def test_generate_wide_keeps_labelled_splits_plain(tmp_path):
    kw = dict(n=8, size=32, seed=4, shard_size=8, heldout_n=8, val_n=8, progress=False)
    plain = S.generate_shapes(str(tmp_path / "plain"), **kw)
    wide = S.generate_shapes(str(tmp_path / "wide"), style="wide", **kw)
    with open(tmp_path / "plain" / S.MANIFEST) as f:
        assert "style" not in json.load(f)  # a plain manifest is what it was before styles
    assert wide["style"] == "wide"
    for a, b in zip(plain["heldout_shards"] + plain["val_shards"], wide["heldout_shards"] + wide["val_shards"]):
        with open(a, "rb") as f, open(b, "rb") as g:
            assert f.read() == g.read()
    tp, tw = read_tar(plain["train_shards"][0]), read_tar(wide["train_shards"][0])
    assert tp.keys() == tw.keys() and tp["000000000.png"] != tw["000000000.png"]
    assert Image.open(io.BytesIO(tw["000000000.png"])).size == (32, 32)
    # the style is a setting: asking the other one is an error unless overwrite, then it is replaced
    with pytest.raises(DataError, match="style=wide"):
        S.generate_shapes(str(tmp_path / "wide"), **kw)
    again = S.generate_shapes(str(tmp_path / "wide"), overwrite=True, **kw)
    assert "style" not in again
    with open(again["train_shards"][0], "rb") as f, open(plain["train_shards"][0], "rb") as g:
        assert f.read() == g.read()


def test_unknown_style():
    with pytest.raises(DataError, match="unknown shapes style"):
        S.make_sample(0, style="fancy")
    with pytest.raises(DataError, match="unknown shapes style"):
        S.generate_shapes("unused-dir", n=1, style="fancy", progress=False)
