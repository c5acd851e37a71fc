"""Synthetic shapes generator: determinism, backgrounds, captions, held-out labels, manifest, CLI."""
import argparse
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from qlip.data import shapes as S
from qlip.errors import DataError


def read_tar(path):
    """{key: {ext: bytes}} of a shard."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shapes"))
    S.generate_shapes(out, n=24, size=64, seed=3, shard_size=10, heldout_n=40, progress=False)
    return out


def test_layout_and_manifest(shapes_dir):
    m = S.read_manifest(shapes_dir)
    assert (m["n"], m["heldout_n"], m["size"], m["seed"], m["version"]) == (24, 40, 64, 3, S.FORMAT_VERSION)
    assert m["train"] == ["shapes-train-000000.tar", "shapes-train-000001.tar", "shapes-train-000002.tar"]
    assert len(m["heldout_shards"]) == 4 and all(os.path.exists(p) for p in m["train_shards"] + m["heldout_shards"])
    samples = {k: v for p in m["train_shards"] for k, v in read_tar(p).items()}
    assert sorted(samples) == [f"{i:09d}" for i in range(24)]
    for key, fields in samples.items():
        assert set(fields) == {"png", "txt", "json", "neg.txt"}
        meta = json.loads(fields["json"])
        assert meta["key"] == key and meta["caption"] == fields["txt"].decode()
        assert 1 <= len(meta["shapes"]) <= 3
        assert Image.open(io.BytesIO(fields["png"])).size == (64, 64)


def test_same_seed_same_bytes(shapes_dir, tmp_path):
    # two worker processes render the shards: bytes must not depend on the number of workers
    S.generate_shapes(str(tmp_path / "a"), n=24, size=64, seed=3, shard_size=10, heldout_n=40, progress=False,
                      workers=2)
    for name in sorted(os.listdir(shapes_dir)):
        with open(os.path.join(shapes_dir, name), "rb") as f, open(tmp_path / "a" / name, "rb") as g:
            assert f.read() == g.read(), name
    img0, cap0, _ = S.make_sample(5, seed=3)
    img1, cap1, _ = S.make_sample(5, seed=4)
    assert cap0 != cap1 or not np.array_equal(np.asarray(img0), np.asarray(img1))


def test_background_far_from_shape_colors():
    for i in range(60):
        img, _, meta = S.make_sample(i, size=64, seed=0, split="train" if i % 2 else "heldout")
        bg = S.render_background(meta["background"], 64)
        for colors, limit in [(list(S.COLORS.values()), S.BG_MIN_DIST), ([s["rgb"] for s in meta["shapes"]], 110)]:
            d = np.sqrt(((bg.reshape(-1, 1, 3).astype(float) - np.array(colors, float)[None]) ** 2).sum(-1))
            assert d.min() >= limit
        assert S._hues_apart(bg)
        # where no shape covers a pixel, the image shows exactly that background
        covered = sum(S.shape_coverage(s, 64) for s in meta["shapes"])
        free = covered == 0
        assert free.sum() > 64 * 64 // 3
        assert np.array_equal(np.asarray(img)[free], bg[free])


def _has_word(text, phrase):
    return re.search(rf"\b{re.escape(phrase)}\b", text) is not None


def test_caption_names_every_shape():
    pos_words = {"left": "left", "right": "right", "top": "top", "bottom": "bottom", "center": ("center", "middle")}
    all_pos = [w for v in pos_words.values() for w in (v if isinstance(v, tuple) else (v,))]
    size_words = ("small", "little", "large", "big")
    n_short = 0
    for i in range(150):
        _, cap, meta = S.make_sample(i, size=64, seed=1)
        assert cap == cap.lower() and "  " not in cap and not re.search(r"\ba [aeiou]", cap), cap
        short = not any(_has_word(cap, w) for w in all_pos)
        n_short += short
        if short:  # a short caption: colours and kinds only, no size word either
            assert not any(_has_word(cap, w) for w in size_words), cap
        for s in meta["shapes"]:
            assert _has_word(cap, s["color"]) and _has_word(cap, s["kind"]), cap
            words = pos_words[s["position"]]
            assert short or any(_has_word(cap, w) for w in (words if isinstance(words, tuple) else (words,))), cap
        n_kinds = sum(_has_word(cap, k) for k in S.KINDS)
        assert n_kinds == len({s["kind"] for s in meta["shapes"]}), cap  # no kind word that is not drawn
    assert 0.35 < n_short / 150 < 0.65, n_short  # SHORT_CAPTION_P = 0.5


def test_kind_is_learnable():
    """Big shapes, little overlap, and many same-color / different-kind images."""
    same_color = multi = 0
    for i in range(200):
        _, _, meta = S.make_sample(i, size=64, seed=2)
        shapes = meta["shapes"]
        for s in shapes:
            assert s["diameter"] >= (14 if s["size"] == "small" else 26)
            assert s["center"][0] - s["diameter"] / 2 >= 0 and s["center"][0] + s["diameter"] / 2 <= 64
        cov = [S.shape_coverage(s, 64) for s in shapes]
        assert not S._overlaps(cov)
        if len(shapes) > 1:
            multi += 1
            colors = [s["color"] for s in shapes]
            same_color += any(colors.count(c) > 1 for c in colors)
            pairs = [(s["color"], s["kind"]) for s in shapes]
            assert len(set(pairs)) == len(pairs)  # never two identical (color, kind) shapes
    assert same_color / multi > 0.25


def test_heldout_labels(shapes_dir):
    m = S.read_manifest(shapes_dir)
    assert len(S.SHAPE_CLASSNAMES) == 32 and m["classnames"] == list(S.SHAPE_CLASSNAMES)
    assert S.shape_prompts()[S.shape_label("blue", "star")] == "a photo of a blue star"
    assert S.SHAPE_CLASSNAMES[S.shape_label("orange", "triangle")] == "orange triangle"
    labels = []
    for path in m["heldout_shards"]:
        for key, f in read_tar(path).items():
            meta, label = json.loads(f["json"]), int(f["cls"])
            assert len(meta["shapes"]) == 1 and meta["label"] == label == meta["shapes"][0]["label"]
            assert label == S.COLOR_NAMES.index(meta["color"]) * 4 + S.KINDS.index(meta["kind"])
            assert S.SHAPE_CLASSNAMES[label] == f"{meta['color']} {meta['kind']}"
            labels.append(label)
    assert sorted(set(labels)) == list(range(32))  # 40 images cover every class


def test_manifest_reuse_and_mismatch(tmp_path):
    out = str(tmp_path / "s")
    S.generate_shapes(out, n=3, size=32, shard_size=2, heldout_n=0, progress=False)
    shard = os.path.join(out, "shapes-train-000000.tar")
    os.utime(shard, (1, 1))
    S.generate_shapes(out, n=3, size=32, shard_size=2, heldout_n=0, progress=False)
    assert os.stat(shard).st_mtime == 1  # same settings: nothing rewritten
    with pytest.raises(DataError, match="n=3"):
        S.generate_shapes(out, n=4, size=32, shard_size=2, heldout_n=0, progress=False)
    m = S.generate_shapes(out, n=1, size=32, shard_size=2, heldout_n=0, overwrite=True, progress=False)
    assert m["n"] == 1 and sorted(os.listdir(out)) == ["manifest.json", "shapes-train-000000.tar"]
    with pytest.raises(DataError):
        S.generate_shapes(out, n=0)


def test_cli(tmp_path, capsys):
    from qlip.data.cli import register

    parser = argparse.ArgumentParser(prog="qlip")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "shapes", str(tmp_path / "c"), "--n", "3", "--size", "32", "--seed", "7",
                              "--heldout", "2", "--shard-size", "2", "--quiet"])
    assert args.func(args) == 0
    m = S.read_manifest(str(tmp_path / "c"))
    assert (m["n"], m["size"], m["seed"], m["heldout_n"], len(m["train"])) == (3, 32, 7, 2, 2)
    assert "3 training images" in capsys.readouterr().out


def test_kind_groups():
    """group=4: four consecutive images share everything but the shape kinds (all four differ)."""
    for g in range(6):
        metas = [S.make_sample(g * 4 + v, seed=1, group=4)[2] for v in range(4)]
        caps = [m["caption"] for m in metas]
        for j in range(len(metas[0]["shapes"])):
            shapes = [m["shapes"][j] for m in metas]
            assert len({s["kind"] for s in shapes}) == 4
            for key in ("color", "size", "position", "rgb", "center", "diameter"):
                assert len({json.dumps(s[key]) for s in shapes}) == 1, key
        assert len({json.dumps(m["background"]) for m in metas}) == 1
        # captions differ only in the kind words
        strip = [re.sub(r"\b(circle|square|triangle|star)s?\b", "K", c) for c in caps]
        assert len(set(strip)) == 1 and len(set(caps)) == 4
    with pytest.raises(DataError, match="multiples of 4"):
        S.generate_shapes("/nonexistent-never-written", n=10, size=64, shard_size=8, group=4, progress=False)
    with pytest.raises(DataError, match="1..4"):
        S.make_sample(0, group=5)


def test_hard_negative_caption_differs_only_in_kinds():
    for i in range(20):
        _, cap, meta = S.make_sample(i, seed=2)
        neg = meta["negative_caption"]
        kinds = r"\b(circle|square|triangle|star)s?\b"
        assert neg != cap and re.sub(kinds, "K", neg) == re.sub(kinds, "K", cap)
        # every shape's kind is shifted by the same non-zero amount, so each kind word changes
        assert all(a != b for a, b in zip(re.findall(kinds, cap), re.findall(kinds, neg)))
    _, _, held = S.make_sample(0, split="heldout")
    assert "negative_caption" not in held


def test_validation_split_is_labelled_balanced_and_apart_from_test(tmp_path):
    m = S.generate_shapes(str(tmp_path), n=4, size=64, seed=3, shard_size=16, heldout_n=32, val_n=32, progress=False)
    assert m["val_n"] == 32 and [os.path.basename(p) for p in m["val_shards"]] == ["shapes-val-000000.tar",
                                                                                    "shapes-val-000001.tar"]
    val = {k: v for p in m["val_shards"] for k, v in read_tar(p).items()}
    test = {k: v for p in m["heldout_shards"] for k, v in read_tar(p).items()}
    assert sorted(val) == sorted(test) == [f"{i:09d}" for i in range(32)]
    assert sorted(int(v["cls"]) for v in val.values()) == list(range(32))  # balanced, labelled
    for key in val:  # same labels, other images: a distinct seed stream
        assert val[key]["cls"] == test[key]["cls"] and val[key]["png"] != test[key]["png"]
        meta = json.loads(val[key]["json"])
        assert meta["split"] == "val" and S.shape_label(meta["color"], meta["kind"]) == int(val[key]["cls"])
    # a manifest from before the split (no val_n) still matches a request without validation images
    path = tmp_path / "old"
    S.generate_shapes(str(path), n=4, size=64, seed=3, shard_size=16, heldout_n=4, val_n=0, progress=False)
    man = json.loads((path / S.MANIFEST).read_text())
    del man["val_n"]
    (path / S.MANIFEST).write_text(json.dumps(man))
    assert S.generate_shapes(str(path), n=4, size=64, seed=3, shard_size=16, heldout_n=4, val_n=0,
                             progress=False)["val_shards"] == []
