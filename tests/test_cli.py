import json
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
    assert code == 0, err
    assert np.load(tmp_path / "g.npy").shape == (2, 4, 4)  # both images of the glob, 4x4 tokens each
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


# ---- issue 10: a newcomer's first hour ------------------------------------------------------
def test_positionals_after_options_are_accepted():
    """`qlip train RECIPE --out DIR optim.steps=2000` (the README order) parses; so do image lists
    split by options."""
    from qlip.cli import build_parser
    p = build_parser()
    a = p.parse_args(["train", "r.yaml", "--out", "runs/s1", "optim.steps=2000", "--resume", "optim.lr=1e-3"])
    assert (a.recipe, a.out, a.resume, a.overrides) == ("r.yaml", "runs/s1", True, ["optim.steps=2000", "optim.lr=1e-3"])
    a = p.parse_args(["balance", "r.yaml", "--out", "b", "loss.alpha_a=0.5", "--steps", "3"])
    assert (a.overrides, a.steps) == (["loss.alpha_a=0.5"], 3)
    a = p.parse_args(["tokenize", "a.png", "--model", "m", "-o", "i.npy", "b.png"])
    assert a.images == ["a.png", "b.png"] and a.output == "i.npy"
    a = p.parse_args(["eval", "compare", "r1", "-o", "cmp", "r2"])
    assert a.runs == ["r1", "r2"] and a.output == "cmp"


def _conv_stem_folder(path):
    import qlip
    qlip.load("qlip-tiny", pretrained=False, **{"vision.stem": "conv"}).save_pretrained(path)
    return path


def test_convert_to_official_refuses_before_writing(tmp_path, capsys):
    _conv_stem_folder(tmp_path / "m")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = run(capsys, "convert", "--model", tmp_path / "m", "--to", "official", "-o", tmp_path / "exported")
    assert code == 2 and "stem" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no temporary left behind
    # an existing output folder is left as it was
    (tmp_path / "exported").mkdir()
    (tmp_path / "exported" / "keep.txt").write_text("x")
    code, _, _ = run(capsys, "convert", "--model", tmp_path / "m", "--to", "official", "-o", tmp_path / "exported")
    assert code == 2 and [p.name for p in (tmp_path / "exported").iterdir()] == ["keep.txt"]


def test_convert_writes_all_files_together(tmp_path, capsys):
    import qlip
    code, _, err = run(capsys, "convert", *M[:-1], "--to", "official", "-o", tmp_path / "exported")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "config.json", "model.safetensors", "preprocessor_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]
    assert qlip.load(str(tmp_path / "exported")).grid == 4


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import qlip
    from qlip.io import checkpoint
    model = qlip.load("qlip-tiny", pretrained=False)

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "atomic_write_text", fail)  # dies after model.safetensors is written
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_written_files_follow_the_umask(tmp_path, capsys, images):
    import os
    import stat

    import qlip
    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "tokenize", images / "grey.jpg", *M, "-o", tmp_path / "ids.npy")
        assert code == 0, err
        qlip.load("qlip-tiny", pretrained=False).save_pretrained(tmp_path / "m")
        os.umask(0o077)
        qlip.load("qlip-tiny", pretrained=False).save_pretrained(tmp_path / "private")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "ids.npy") == 0o644
    assert mode(tmp_path / "m") == 0o755
    assert {p.name: mode(p) for p in (tmp_path / "m").iterdir()} == {"config.json": 0o644, "model.safetensors": 0o644}
    assert mode(tmp_path / "private") == 0o700 and mode(tmp_path / "private" / "model.safetensors") == 0o600


def test_offline_hub_id_names_a_working_command(capsys, monkeypatch):
    from importlib.metadata import entry_points

    import qlip
    from qlip.errors import CheckpointError
    from qlip.io.checkpoint import hub_cli
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    cli = hub_cli()
    # the command we name is a console script of the installed huggingface_hub
    eps = entry_points()  # Python 3.9: a dict of groups; 3.10+: .select
    scripts = eps.select(group="console_scripts") if hasattr(eps, "select") else eps["console_scripts"]
    assert cli in {ep.name for ep in scripts if ep.value.startswith("huggingface_hub")}
    with pytest.raises(CheckpointError) as e:
        qlip.load("nvidia/QLIP-B-16-256")
    msg = str(e.value)
    assert f"`{cli} download nvidia/QLIP-B-16-256 --local-dir DIR`" in msg and "qlip.load(DIR)" in msg
    assert "\n" not in msg and "models--" not in msg
    code, _, err = run(capsys, "convert", "--model", "nvidia/QLIP-B-16-256", "-o", "never")
    assert code == 2 and "--model DIR" in err and "qlip.load" not in err and err.count("\n") == 1


def test_hub_cache_layout_and_local_folder_are_honoured(tmp_path, monkeypatch):
    """Both alternatives of the offline message work: the folder of `hf download --local-dir DIR`
    passed directly, and the hub cache that `hf download REPO` fills (snapshots/<hash>/ + refs/main)."""
    import torch

    import qlip
    torch.manual_seed(0)
    qlip.load("qlip-tiny", pretrained=False).save_pretrained(tmp_path / "DIR")
    assert qlip.load(str(tmp_path / "DIR")).grid == 4
    repo = tmp_path / "hub" / "models--nvidia--QLIP-B-16-256"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (tmp_path / "DIR").rename(repo / "snapshots" / commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model = qlip.load("nvidia/QLIP-B-16-256")
    assert model.grid == 4 and model._source_folder == str(repo / "snapshots" / commit)


def test_zero_shot_template_placeholders(images, capsys):
    img = images / "grey.jpg"
    outs = []
    for template in ("a photo of {}", "a photo of {c}"):
        code, out, err = run(capsys, "zero-shot", img, "--labels", "a dog,a cat", "--template", template, *M[:-1])
        assert code == 0 and "Traceback" not in err, err
        outs.append(out)
    assert outs[0] == outs[1]  # {c} and {} give the same prompts
    code, out, err = run(capsys, "zero-shot", img, "--labels", "a dog,a cat", "--template", "a photo", *M[:-1])
    assert code == 2 and "placeholder" in err and err.count("\n") == 1 and out == ""


def test_outputs_of_the_wrong_kind_are_one_line_errors(images, tmp_path, capsys):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    np.save(tmp_path / "ids.npy", np.zeros((1, 4, 4), dtype=np.int64))
    for argv in (["tokenize", images / "grey.jpg", *M, "-o", tmp_path / "dir"],
                 ["tokenize", images / "grey.jpg", *M, "-o", tmp_path / "i.npy", "--list", tmp_path / "dir"],
                 ["detokenize", tmp_path / "ids.npy", *M, "-o", tmp_path / "file"],
                 ["reconstruct", images / "grey.jpg", *M, "-o", tmp_path / "file"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and err.startswith("qlip: error: ") and err.count("\n") == 1, (argv, err)
    assert (tmp_path / "file").read_text() == "x" and not (tmp_path / "i.npy").exists()


def test_id_arrays_empty_converted_and_out_of_range(tmp_path, capsys):
    np.save(tmp_path / "empty.npy", np.zeros((0, 4, 4), dtype=np.int64))
    code, out, err = run(capsys, "detokenize", tmp_path / "empty.npy", *M, "-o", tmp_path / "o")
    assert code == 2 and "empty" in err and not (tmp_path / "o").exists()
    np.save(tmp_path / "one.npy", np.arange(16, dtype=np.int32).reshape(4, 4))
    code, out, err = run(capsys, "detokenize", tmp_path / "one.npy", *M, "-o", tmp_path / "o")
    assert code == 0 and out == f"wrote 1 PNG image to {tmp_path / 'o'}\n"
    assert f"{tmp_path / 'one.npy'}: read shape (4, 4) as one image and int32 ids as int64" in err
    np.save(tmp_path / "u.npy", np.arange(32, dtype=np.uint64).reshape(2, 4, 4))
    code, out, err = run(capsys, "detokenize", tmp_path / "u.npy", *M, "-o", tmp_path / "o2")
    assert code == 0 and "uint64 ids as int64" in err and out.startswith("wrote 2 PNG images")
    np.save(tmp_path / "big.npy", np.full((1, 4, 4), 2 ** 28, dtype=np.int64))
    code, out, err = run(capsys, "detokenize", tmp_path / "big.npy", *M, "-o", tmp_path / "o3")
    assert code == 2 and err.startswith(f"qlip: error: {tmp_path / 'big.npy'}: ") and "2**28" in err


def test_balance_writes_next_to_its_runs_not_the_recipe(tiny_shapes, tmp_path, capsys):
    import yaml
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    recipe = {"model": {"preset": "qlip-tiny"},
              "data": {"train": str(tiny_shapes / "shapes-train-*.tar"), "batch_size": 4, "shuffle_buffer": 4},
              "optim": {"steps": 1, "warmup_steps": 0},
              "train": {"progress": False, "tensorboard": False, "log_every": 1}}
    (pkg / "stage1.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = run(capsys, "balance", pkg / "stage1.yaml", "--out", tmp_path / "probes", "optim.lr=1e-3")
    assert code == 0, err
    assert [p.name for p in pkg.iterdir()] == ["stage1.yaml"]  # nothing written beside the recipe
    balanced = tmp_path / "probes" / "stage1.balanced.yaml"
    assert json.loads(out)["output"] == str(balanced)
    assert yaml.safe_load(balanced.read_text())["optim"]["lr"] == 1e-3
