"""One list of image extensions, one folder walker, one decoder and one tar reader, shared by
the CLI, the training loaders and the evaluation sets."""
import collections
import io
import tarfile

import pytest
import torch
from PIL import Image

import qlip.cli
from qlip.data import (IMAGE_EXTS, ShardDataset, TarSource, decode_image, expand_images, find_images, is_image_file,
                       open_dataset, read_image_folder)
from qlip.errors import DataError


def _png(color, size=8, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_extensions_and_hidden_files():
    assert {"png", "jpg", "jpeg", "webp", "pgm", "ppm", "tif", "gif", "bmp"} <= set(IMAGE_EXTS)
    assert is_image_file("a/B.PGM") and is_image_file("x.tar.png") and not is_image_file("a.txt")
    assert not is_image_file(".hidden.png") and not is_image_file("png")
    assert qlip.cli.expand_images is expand_images  # the CLI walks folders with the same function


def test_folder_walk_order_and_class_folders(tmp_path):
    for rel in ("b/2.png", "b/10.PNG", "a/sub/z.jpg", "a/1.pgm", "a/.ipynb_checkpoints/c.png", "a/.x.png", "a/n.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    rel = lambda paths: [str(p)[len(str(tmp_path)) + 1:] for p in paths]  # noqa: E731
    assert rel(find_images(str(tmp_path))) == ["a/1.pgm", "a/sub/z.jpg", "b/10.PNG", "b/2.png"]
    assert find_images(str(tmp_path / "b"), recursive=False) == find_images(str(tmp_path / "b"))
    assert expand_images([str(tmp_path / "b"), str(tmp_path / "a" / "1.pgm")])[-1].endswith("a/1.pgm")
    items, classes = read_image_folder(str(tmp_path))
    assert classes == ["a", "b"] and [y for _, y in items] == [0, 0, 1, 1]
    (tmp_path / "c").mkdir()
    with pytest.raises(DataError, match="class folder holds no image files"):
        read_image_folder(str(tmp_path))
    with pytest.raises(DataError, match="contains no images"):
        expand_images([str(tmp_path / "c")])


def test_decode_composites_alpha_on_white():
    buf = io.BytesIO()
    Image.new("RGBA", (2, 2), (0, 0, 0, 0)).save(buf, format="PNG")
    img = decode_image(buf.getvalue())
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(Exception):
        decode_image(b"not an image")


def test_training_and_evaluation_read_the_same_tar_samples(tmp_path):
    """A sample with two images takes the first in IMAGE_EXTS order in both readers; a
    truncated shard keeps the samples before the damage and is reported, not fatal."""
    red, blue = _png((255, 0, 0)), _png((0, 0, 255), fmt="JPEG")
    good = _tar(tmp_path / "s-0.tar", [("k0.jpg", blue), ("k0.png", red), ("k0.txt", b"a"), ("k0.cls", b"3"),
                                       ("k1.jpg", blue), ("k1.txt", b"b"), ("k1.cls", b"1")])
    train = list(TarSource(str(good), label_key="cls").read(str(good), collections.Counter(), print))
    assert [(s["key"], s["label"]) for s in train] == [("k0", 3), ("k1", 1)]
    assert decode_image(train[0]["image"]).getpixel((0, 0)) == (255, 0, 0)
    ds = open_dataset(good)
    assert isinstance(ds, ShardDataset)
    (x, y), = ds.batches(lambda pils: torch.stack([torch.tensor(p.getpixel((0, 0))) for p in pils]), batch_size=4)
    assert y.tolist() == [3, 1] and x[0].tolist() == [255, 0, 0]

    with tarfile.open(good) as tar:
        cut = next(m.offset for m in tar.getmembers() if m.name == "k1.jpg") + 700  # inside k1's image
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "s-1.tar").write_bytes(good.read_bytes()[:cut])
    ds = ShardDataset(str(tmp_path / "t"))
    with pytest.warns(UserWarning, match="unreadable or truncated"):
        (x, y), = ds.batches(lambda pils: torch.zeros(len(pils)), batch_size=4)
    assert y.tolist() == [3]

