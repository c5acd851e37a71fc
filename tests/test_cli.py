import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from qlip.cli import main

M = ["--model", "qlip-tiny", "--random-init", "-q"]


@pytest.fixture
def images(tmp_path):
    rs = np.random.RandomState(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rs.randint(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rs.randint(0, 255, (30, 30, 3), dtype=np.uint8)).convert("RGBA").save(folder / "a.png")
    Image.fromarray(rs.randint(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "grey.jpg")
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tokenize_detokenize_round_trip(images, tmp_path, capsys):
    ids_path = tmp_path / "ids.npy"
    code, out, err = run(capsys, "tokenize", images / "grey.jpg", images / "imgs", *M, "-o", ids_path,
                         "--list", tmp_path / "list.txt", "--batch-size", 2)
    assert code == 0, err
    ids = np.load(ids_path)
    assert ids.shape == (3, 4, 4) and ids.dtype == np.int64
    # argument order, folder contents sorted
    assert (tmp_path / "list.txt").read_text().split() == [str(images / "grey.jpg"), str(images / "imgs" / "a.png"),
                                                           str(images / "imgs" / "b.png")]
    # same as tokenizing one by one (batching does not change ids)
    code, _, _ = run(capsys, "tokenize", images / "imgs" / "b.png", *M, "-o", tmp_path / "one.npy")
    assert np.array_equal(np.load(tmp_path / "one.npy")[0], ids[2])
    code, out, err = run(capsys, "detokenize", ids_path, *M, "-o", tmp_path / "out")
    assert code == 0, err
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
    assert Image.open(pngs[0]).size == (32, 32)
    # detokenize(tokenize(x)) equals reconstruct(x)
    code, _, _ = run(capsys, "reconstruct", images / "grey.jpg", *M, "-o", tmp_path / "rec")
    rec = np.asarray(Image.open(next((tmp_path / "rec").glob("*.png"))))
    assert np.abs(rec.astype(int) - np.asarray(Image.open(pngs[0])).astype(int)).max() <= 1


def test_glob_and_info_and_zero_shot(images, tmp_path, capsys):
    code, _, err = run(capsys, "tokenize", str(images / "imgs" / "*.png"), *M, "-o", tmp_path / "g.npy")
    assert code == 0, err and np.load(tmp_path / "g.npy").shape[0] == 2
    code, out, _ = run(capsys, "info", "qlip-tiny", "--random-init")
    assert code == 0 and "compression ratio 24*p^2/L = 54.86" in out and "28 bits" in out
    code, out, _ = run(capsys, "zero-shot", images / "grey.jpg", "--labels", "a dog, a cat", *M[:-1])
    assert code == 0 and ("a dog" in out and "a cat" in out)


@pytest.mark.parametrize("case", ["truncated", "not_image", "missing", "empty_dir"])
def test_bad_images_one_line_error(images, tmp_path, capsys, case):
    if case == "truncated":
        data = (images / "imgs" / "b.png").read_bytes()
        bad = tmp_path / "t.png"
        bad.write_bytes(data[: len(data) // 2])
    elif case == "not_image":
        bad = tmp_path / "x.jpg"
        bad.write_text("hello")
    elif case == "missing":
        bad = tmp_path / "nope.png"
    else:
        bad = tmp_path / "empty"
        bad.mkdir()
    code, out, err = run(capsys, "tokenize", bad, *M, "-o", tmp_path / "i.npy")
    assert code == 2
    assert err.startswith("qlip: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "i.npy").exists()


@pytest.mark.parametrize("arr,msg", [
    (np.full((1, 4, 4), 2 ** 28, dtype=np.int64), "2**28"),
    (np.full((1, 4, 4), -1, dtype=np.int64), "2**28"),
    (np.zeros((1, 3, 4), dtype=np.int64), "shape"),
    (np.zeros((1, 4, 4), dtype=np.float32), "integers"),
])
def test_bad_ids_one_line_error(tmp_path, capsys, arr, msg):
    np.save(tmp_path / "ids.npy", arr)
    code, out, err = run(capsys, "detokenize", tmp_path / "ids.npy", *M, "-o", tmp_path / "o")
    assert code == 2 and msg in err and err.count("\n") == 1


def test_bad_checkpoint_one_line_error(tmp_path, capsys):
    import torch
    import qlip
    from safetensors.torch import load_file, save_file
    qlip.load("qlip-tiny", pretrained=False).save_pretrained(tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    sd["decoder.head_out.weight"] = torch.zeros(5, 5)
    save_file(sd, tmp_path / "m" / "model.safetensors")
    code, _, err = run(capsys, "info", tmp_path / "m")
    assert code == 2 and "decoder.head_out.weight (5, 5)" in err and err.count("\n") == 1


def test_console_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "qlip", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "tokenize" in r.stdout and "detokenize" in r.stdout
