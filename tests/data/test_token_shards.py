"""`qlip data tokenize`: ids equal model.tokenize, corrupt samples skipped and counted, SIGKILL +
resume, two ranks, incompatible output, --merge-index, one-line errors."""
import filecmp
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import qlip
from qlip.cli import main
from qlip.data import decode_image, image_transform
from qlip.data.shapes import generate_shapes, write_tar
from qlip.data.tokens import DELAY_ENV, TokenShardDataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ["--model", "qlip-tiny", "--random-init", "--seed", "0"]


def _png(rs, size=(40, 36)):
    buf = io.BytesIO()
    Image.fromarray(rs.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """4 shapes shards of 8 images (32 px) + one shard with 3 good and 3 corrupt samples."""
    root = tmp_path_factory.mktemp("tok-src")
    m = generate_shapes(str(root / "shapes"), n=32, size=32, seed=0, shard_size=8, heldout_n=0, progress=False)
    rs = np.random.RandomState(0)
    good = [_png(rs) for _ in range(4)]
    samples = [("x0", {"png": good[0], "txt": b"first good"}),
               ("x1", {"png": b"this is not a png", "txt": b"undecodable"}),
               ("x2", {"png": good[1], "txt": "caf\u00e9 caption".encode()}),
               ("x3", {"png": good[2]}),                                     # no caption
               ("x4", {"png": good[3][: len(good[3]) // 2], "txt": b"truncated image"}),
               ("x5", {"png": good[3], "txt": b"last good"})]
    extra = str(root / "extra.tar")
    write_tar(extra, samples)
    return m["train_shards"] + [extra]


def _reference_ids(shards):
    """Ids and captions computed directly: decode_image + the trainer's image_transform + tokenize."""
    torch.manual_seed(0)
    model = qlip.load("qlip-tiny", pretrained=False).eval()
    tf = image_transform(model.image_size, model.image_mean, model.image_std)
    xs, pils, caps, keys = [], [], [], []
    for path in shards:
        fields = {}
        with tarfile.open(path) as tar:
            for mem in tar:
                key, ext = mem.name.split(".", 1)
                fields.setdefault(key, {})[ext] = tar.extractfile(mem).read()
        for key, f in fields.items():
            if "txt" not in f:
                continue
            try:
                img = decode_image(f["png"])
            except Exception:  # noqa: BLE001 - the corrupt samples of the test shard
                continue
            xs.append(tf(img))
            pils.append(img)
            caps.append(f["txt"].decode())
            keys.append(key)
    ids = model.tokenize(torch.stack(xs)).flatten(1)
    # for this model (resize == crop == image size) the trainer's transform is model.preprocess
    assert torch.equal(model.tokenize(model.preprocess(pils)).flatten(1), ids)
    return ids, caps, keys


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """One uninterrupted single-rank run (in-process CLI)."""
    out = str(tmp_path_factory.mktemp("tok-ref") / "tokens")
    code = main(["data", "tokenize", *shards, *MODEL, "--out", out, "--batch-size", "5", "--workers", "0", "-q"])
    assert code == 0
    return out


def _cmd(shards, out, *extra):
    return [sys.executable, "-m", "qlip", "data", "tokenize", *shards, *MODEL, "--out", out, "-q", *extra]


def _env(**kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **kw)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _assert_same_dir(a, b):
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    assert not any(n.startswith(".") for n in names)  # no temporaries left behind
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    assert mismatch == [] and errors == []


def test_ids_equal_model_tokenize_and_corrupt_samples_counted(shards, reference, capsys):
    ids, caps, keys = _reference_ids(shards)
    ds = TokenShardDataset(reference)
    assert len(ds) == 32 + 3 == len(ids)
    assert ds.ids[np.arange(len(ds))].dtype == np.int32
    assert torch.equal(torch.from_numpy(ds.ids[np.arange(len(ds))].astype(np.int64)), ids)
    assert ds.captions[np.arange(len(ds))] == caps and ds.keys[np.arange(len(ds))] == keys
    assert ds.captions[34] == "last good" and ds.captions[33] == "caf\u00e9 caption"
    # every part is a plain .npy that np.load can map
    arr = np.load(os.path.join(reference, "tokens-000004.npy"), mmap_mode="r")
    assert isinstance(arr, np.memmap) and arr.shape == (3, 16)
    index = json.load(open(os.path.join(reference, "index.json")))
    assert [p["count"] for p in index["shards"]] == [8, 8, 8, 8, 3]
    assert (index["skipped"], index["decode_errors"], index["incomplete"]) == (3, 2, 1)
    assert index["shards"][4]["skipped"] == 3 and index["shards"][0]["skipped"] == 0
    assert index["sources"] == [os.path.abspath(s) for s in shards]
    assert index["grid"] == [4, 4] and index["bits"] == 28 and index["model"]["name"] == "qlip-tiny"
    # a second run of the same command finds everything done and changes nothing
    before = {n: open(os.path.join(reference, n), "rb").read() for n in os.listdir(reference)}
    assert main(["data", "tokenize", *shards, *MODEL, "--out", reference, "--workers", "0", "-q"]) == 0
    out = capsys.readouterr().out
    assert "wrote 0 parts" in out and "5 already done" in out and "35 samples in 5 parts, 3 skipped" in out
    assert {n: open(os.path.join(reference, n), "rb").read() for n in os.listdir(reference)} == before


def test_sigkill_then_resume_matches_uninterrupted_run(shards, reference, tmp_path, capsys):
    out = str(tmp_path / "tokens")
    proc = subprocess.Popen(_cmd(shards, out, "--workers", "0"), env=_env(**{DELAY_ENV: "60"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = os.path.join(out, "tokens-000000.json")
    deadline = time.time() + 90
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL while it sleeps after the first part
    _, err = proc.communicate()
    assert os.path.exists(first), err.decode()
    assert not os.path.exists(os.path.join(out, "tokens-000001.json"))
    assert not os.path.exists(os.path.join(out, "index.json"))
    # what a kill in the middle of part 1 could leave: a temporary and an unmarked ids file
    open(os.path.join(out, ".tokens-000001.npy.abc123.tmp"), "wb").write(b"half")
    open(os.path.join(out, "tokens-000001.npy"), "wb").write(b"garbage")
    with pytest.raises(qlip.errors.DataError, match="incomplete"):
        TokenShardDataset(out)
    done = open(first, "rb").read()
    # the same command again (in-process: a second interpreter start would only cost time)
    assert main(_cmd(shards, out, "--workers", "0")[3:]) == 0
    res = capsys.readouterr().out
    assert "wrote 4 parts" in res and "1 already done" in res and "parts 1,2,3,4" in res
    assert open(first, "rb").read() == done  # the finished part was not redone
    _assert_same_dir(out, reference)
    ds = TokenShardDataset(out)
    assert len(set(ds.keys[np.arange(len(ds))])) == len(ds) == 35  # no duplicates, none missing


def test_two_ranks_write_disjoint_parts_whose_union_is_the_one_rank_output(shards, reference, tmp_path):
    out = str(tmp_path / "tokens")
    procs = [subprocess.Popen(_cmd(shards, out, "--workers", str(1 - r), "--batch-size", "3"),
                              env=_env(RANK=str(r), WORLD_SIZE="2"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "rank 0/2:" in outs[0][0] and "parts 0,2,4" in outs[0][0]
    assert "rank 1/2:" in outs[1][0] and "parts 1,3" in outs[1][0]
    # whichever rank finished last wrote the index; files equal the single-rank run byte for byte
    # (other batch sizes and worker counts: parts do not depend on them)
    _assert_same_dir(out, reference)


def test_incompatible_output_overwrite_and_merge_index(shards, reference, tmp_path, capsys):
    out = str(tmp_path / "tokens")
    shutil.copytree(reference, out)
    base = ["data", "tokenize", *shards, "--model", "qlip-tiny", "--random-init", "--out", out, "--workers", "0", "-q"]
    # another model (other random weights) into the same directory
    assert main(base + ["--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another run" in err and "qlip-tiny" in err and "--overwrite" in err
    # other input shards
    assert main(["data", "tokenize", *shards[:2], *MODEL, "--out", out, "-q"]) == 2
    assert "source shards" in capsys.readouterr().err
    assert main(base + ["--seed", "1", "--overwrite"]) == 0
    capsys.readouterr()
    new, old = TokenShardDataset(out), TokenShardDataset(reference)
    assert len(new) == len(old) and new.fingerprint != old.fingerprint
    assert not np.array_equal(new.ids[np.arange(len(new))], old.ids[np.arange(len(old))])
    # --merge-index rebuilds the same index from the parts, without a model
    index = open(os.path.join(out, "index.json")).read()
    os.remove(os.path.join(out, "index.json"))
    assert main(["data", "tokenize", "--out", out, "--merge-index"]) == 0
    assert "35 samples in 5 parts, 3 skipped" in capsys.readouterr().out
    assert open(os.path.join(out, "index.json")).read() == index
    os.remove(os.path.join(out, "tokens-000002.json"))
    assert main(["data", "tokenize", "--out", out, "--merge-index"]) == 2
    assert "1 of 5 parts are missing or incomplete (tokens-000002)" in capsys.readouterr().err


def test_one_line_errors(shards, tmp_path, capsys):
    out = str(tmp_path / "tokens")
    cases = [
        (["data", "tokenize", str(tmp_path / "nothing-*.tar"), *MODEL, "--out", out], "no shards match"),
        (["data", "tokenize", str(tmp_path), *MODEL, "--out", out], "holds no .tar shards"),
        (["data", "tokenize", shards[0], "--model", str(tmp_path / "no-model"), "--out", out], "is not a folder"),
        (["data", "tokenize", shards[0], "--out", out], "--model is required"),
        (["data", "tokenize", "--out", str(tmp_path / "empty"), "--merge-index"], "not a token-shard directory"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("qlip: error:") and msg in err and "\n" not in err, err
    os.makedirs(str(tmp_path / "empty"), exist_ok=True)
    with pytest.raises(qlip.errors.DataError, match="no index.json"):
        TokenShardDataset(str(tmp_path / "empty"))


# ---- filter_token_shards: a caption-filtered copy (the t2i and UM3 demos' single shapes) -----------
def _fake_shards(root, caps, bits=8, dtype="int32"):
    from qlip.data import tokens as T
    root.mkdir()
    cfg = {"format": T.FORMAT, "version": T.FORMAT_VERSION, "model": {"name": "fake", "encoder_sha256": "e"},
           "bits": bits, "grid": [1, 2], "dtype": dtype, "preprocess": {}, "sources": ["fake"]}
    cfg["fingerprint"] = T._config_fingerprint(cfg)
    (root / T.CONFIG).write_text(json.dumps(cfg))
    ids = np.arange(2 * len(caps), dtype=dtype).reshape(len(caps), 2)
    T.write_part(str(root), 0, cfg, ids, [f"k{i}" for i in range(len(caps))], caps, {})
    return T.build_index(str(root))


def test_filter_token_shards_keeps_exactly_the_single_shape_rows(tmp_path):
    from qlip.data import tokens as T
    from qlip.data.shapes import SINGLE_SHAPES, single_shape_caption
    caps = ["a red circle", "a red circle and a blue star", "two green shapes: a square and a star",
            "there is a small white triangle at the top", "a picture showing a black star on a plain background"]
    src_index = _fake_shards(tmp_path / "src", caps)
    n = T.filter_token_shards(str(tmp_path / "src"), str(tmp_path / "dst"), single_shape_caption, SINGLE_SHAPES)
    assert n == 3
    ds = T.TokenShardDataset(str(tmp_path / "dst"))
    assert [str(ds.captions[i]) for i in range(len(ds))] == [caps[0], caps[3], caps[4]]
    assert [str(k) for k in ds.keys] == ["k0", "k3", "k4"]
    assert np.asarray(ds.ids[1]).tolist() == [6, 7] and int(ds.bits) == 8
    dst_index = T.read_index(str(tmp_path / "dst"))
    assert np.load(T.part_paths(str(tmp_path / "dst"), 0)["ids"]).dtype == np.int32  # the source's dtype
    # its own fingerprint: a run trained on the subset is not taken for one trained on everything
    assert dst_index["fingerprint"] != src_index["fingerprint"]
    assert dst_index["sources"] == [f"{tmp_path / 'src'} ({SINGLE_SHAPES})"]
    assert dst_index["filtered_from"] == src_index["fingerprint"]
    # another source's subset (other ids, same folder name and filter) has another fingerprint
    shutil.rmtree(tmp_path / "src")
    other = _fake_shards(tmp_path / "src", caps, bits=9)
    T.filter_token_shards(str(tmp_path / "src"), str(tmp_path / "dst2"), single_shape_caption, SINGLE_SHAPES)
    assert T.read_index(str(tmp_path / "dst2"))["fingerprint"] not in (dst_index["fingerprint"], other["fingerprint"])
    # a second filtering replaces the first
    assert T.filter_token_shards(str(tmp_path / "src"), str(tmp_path / "dst"), lambda c: "circle" in c, "circles") == 2
    assert len(T.TokenShardDataset(str(tmp_path / "dst"))) == 2


def test_filter_token_shards_refuses_an_empty_result(tmp_path):
    from qlip.data import tokens as T
    from qlip.errors import DataError
    _fake_shards(tmp_path / "src", ["a red circle and a blue star"])
    with pytest.raises(DataError, match="no caption .* kept by the filter"):
        T.filter_token_shards(str(tmp_path / "src"), str(tmp_path / "dst"), lambda c: False, "nothing")
    assert not (tmp_path / "dst").exists()


def test_single_shape_caption_counts_kind_words():
    from qlip.data.shapes import caption_kinds, single_shape_caption
    assert caption_kinds("two shapes: a small green circle on the left with a small green star") == ["circle", "star"]
    assert single_shape_caption("a photo of a yellow circle on the right on a solid background")
    assert not single_shape_caption("a yellow triangle, a blue triangle, and a red triangle")
    assert not single_shape_caption("a thing")
