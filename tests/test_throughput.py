"""Parallel image decoding for `qlip tokenize` / `qlip reconstruct` (qlip.data.decode): the same
batches, hence the same ids, with any number of workers, and one-line errors from workers."""
import numpy as np
import pytest
import torch
from PIL import Image

import qlip
from qlip.cli import main
from qlip.data.decode import image_batches
from qlip.errors import DataError

M = ["--model", "qlip-tiny", "--random-init", "-q"]


@pytest.fixture
def core_cli(monkeypatch):
    """The core commands only: downstream areas other sessions are writing do not matter here."""
    monkeypatch.setattr("qlip.cli.DOWNSTREAM_AREAS", ())


@pytest.fixture
def folder(tmp_path):
    rs = np.random.RandomState(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (h, w) in enumerate([(40, 52), (33, 33), (64, 48), (32, 32), (90, 40)]):
        Image.fromarray(rs.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def test_batches_equal_model_preprocess_for_any_workers(folder):
    model = qlip.load("qlip-tiny", pretrained=False)
    paths = sorted(str(p) for p in folder.glob("*.png"))
    want = model.preprocess(paths)
    for workers in (0, 2):
        got = list(image_batches(paths, model.config.preprocess, batch_size=2, workers=workers))
        assert [len(x) for x in got] == [2, 2, 1]
        assert torch.equal(torch.cat(got), want)  # bit-identical to model.preprocess


def test_cli_tokenize_same_ids_with_workers_0_and_2(folder, tmp_path, capsys, core_cli):
    for w in (0, 2):
        assert main(["tokenize", str(folder), *M, "--batch-size", "2", "--workers", str(w),
                     "-o", str(tmp_path / f"w{w}.npy")]) == 0
        assert main(["reconstruct", str(folder), *M, "--batch-size", "2", "--workers", str(w),
                     "-o", str(tmp_path / f"rec{w}")]) == 0
    a, b = np.load(tmp_path / "w0.npy"), np.load(tmp_path / "w2.npy")
    assert a.shape == (5, 4, 4) and np.array_equal(a, b)
    for name in sorted(p.name for p in (tmp_path / "rec0").iterdir()):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "rec0" / name)),
                              np.asarray(Image.open(tmp_path / "rec2" / name)))


def test_unreadable_file_in_a_worker_is_one_line(folder, tmp_path, capsys, core_cli):
    (folder / "9.png").write_bytes(b"not a png")
    paths = sorted(str(p) for p in folder.glob("*.png"))
    with pytest.raises(DataError, match=r"9\.png: cannot read image") as e:
        list(image_batches(paths, qlip.load("qlip-tiny", pretrained=False).config.preprocess, 2, workers=2))
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    assert main(["tokenize", str(folder), *M, "--batch-size", "2", "--workers", "2",
                 "-o", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlip: error: ") and "9.png: cannot read image" in err and "\n" not in err
    assert not (tmp_path / "x.npy").exists()
    with pytest.raises(DataError, match="--workers must be >= 0"):
        list(image_batches(paths, None, 2, workers=-1))
