"""Evaluation sets (image folders, labelled shards): batches, labels, skipped files, one-line errors."""
import io
import tarfile
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from qlip.data.evalsets import ImageFolderDataset, ShardDataset, open_dataset
from qlip.errors import DataError


def _png(color, size=8):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, classes=("cat", "dog"), n=2):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            (root / c / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
    return root


def _pp(pils):
    return torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1).float() / 255 for p in pils])


def test_folder_reader_batches_labels_and_skips_corrupt(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "dog" / "broken.jpg").write_bytes(b"not an image")
    ds = open_dataset(root)
    assert isinstance(ds, ImageFolderDataset) and ds.classes == ["cat", "dog"] and len(ds) == 5
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\) in .*: .*broken\.jpg"):  # named (issue 10)
        batches = list(ds.batches(_pp, batch_size=3))
    assert [b[0].shape[0] for b in batches] == [3, 1]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 1, 1]
    with warnings.catch_warnings():  # the limited subset may include the broken file
        warnings.simplefilter("ignore", UserWarning)
        assert sum(len(b[1]) for b in ds.batches(_pp, batch_size=3, limit=4)) <= 4
    assert ds.fingerprint() == ImageFolderDataset(root).fingerprint()


def test_flat_folder_is_unlabelled(tmp_path):
    (tmp_path / "a.png").write_bytes(_png((1, 2, 3)))
    ds = open_dataset(tmp_path)
    assert not ds.labelled and ds.classes is None
    assert next(iter(ds.batches(_pp)))[1].tolist() == [-1]


def test_bad_folders_give_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("hi")
    with pytest.raises(DataError, match="no image files") as e:
        open_dataset(tmp_path / "txt")
    assert "\n" not in str(e.value)
    (tmp_path / "cls" / "a").mkdir(parents=True)
    (tmp_path / "cls" / "a" / "x.csv").write_text("1")
    with pytest.raises(DataError, match="class folder"):
        open_dataset(tmp_path / "cls")
    with pytest.raises(DataError, match="no such"):
        open_dataset(tmp_path / "missing")


def test_shards_with_cls_labels(tmp_path):
    path = tmp_path / "s-000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(3):
            for ext, data in (("png", _png((0, 50 * i, 0))), ("cls", str(i % 2).encode()), ("txt", b"x")):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = open_dataset(path)
    assert isinstance(ds, ShardDataset)
    (x, y), = list(ds.batches(_pp, batch_size=8))
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 1, 0]
    assert isinstance(open_dataset(str(tmp_path / "s-*.tar")), ShardDataset)
