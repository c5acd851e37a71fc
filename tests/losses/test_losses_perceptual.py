import subprocess
import sys
import warnings

import pytest
import torch

import qlip.losses.perceptual as perceptual
from qlip.losses import LPIPSRandomBackboneWarning, PerceptualLoss, normalized_to_pm1


@pytest.fixture(scope="module")
def lpips_loss():
    # offline in this environment: random VGG trunk (the warning is tested separately)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LPIPSRandomBackboneWarning)
        return PerceptualLoss(backbone="random")


def test_identical_zero_different_positive(lpips_loss):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert lpips_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert lpips_loss(x, y).item() > 1e-3
    assert lpips_loss(x, y).shape == ()


def test_linear_heads_are_lpips_own_read_as_tensors_only(monkeypatch):
    """The heads shipped in the lpips package are loaded with ``weights_only=True`` (lpips' own
    ``pretrained=True`` unpickles them on torch < 2.6) and equal what lpips itself loads."""
    import lpips
    real_load, calls = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = PerceptualLoss(net="alex", backbone="random").lpips.state_dict()
        assert calls == [True]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # PerceptualLoss's seed for the random trunk
            ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False).state_dict()
        fresh = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False).state_dict()
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert not torch.equal(ours["lin0.model.1.weight"], fresh["lin0.model.1.weight"])  # loaded, not the init


def test_gradients_reach_input_not_lpips(lpips_loss):
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    lpips_loss(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in lpips_loss.parameters())
    lpips_loss.train()
    assert not lpips_loss.lpips.training  # stays in eval mode


def test_normalised_input_conversion(lpips_loss):
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    x01 = torch.rand(1, 3, 32, 32)
    xn = (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(normalized_to_pm1(xn, mean, std), x01 * 2 - 1, atol=1e-6, rtol=0)
    # a second module with conversion on; the seeded random trunk is the same network
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LPIPSRandomBackboneWarning)
        conv = PerceptualLoss(backbone="random", input_mean=mean, input_std=std, reduction="none")
    assert torch.equal(torch.get_rng_state(), rng)  # construction leaves the global RNG alone
    y01 = torch.rand(1, 3, 32, 32)
    yn = (y01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(conv(xn, yn), lpips_loss(x01 * 2 - 1, y01 * 2 - 1).reshape(1), atol=1e-5, rtol=0)


def test_backbone_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert perceptual.vgg16_weights_path().parent == tmp_path / "hub" / "checkpoints"
    assert perceptual.resolve_lpips_backbone("auto") is False  # offline, not cached
    assert perceptual.resolve_lpips_backbone("random") is False
    calls = []
    monkeypatch.setattr(perceptual, "_download_vgg16", lambda timeout, net="vgg": calls.append(net) or False)
    monkeypatch.setattr(perceptual, "_RESOLVED", {})
    with pytest.raises(perceptual.QLIPError, match="torchvision vgg weights"):
        perceptual.resolve_lpips_backbone("pretrained")
    with pytest.raises(perceptual.QLIPError, match="alexnet"):  # each trunk has its own weights file
        perceptual.resolve_lpips_backbone("pretrained", net="alex")
    assert calls == ["vgg", "alex"]
    with pytest.raises(perceptual.QLIPError):  # a failed download is not retried in the process
        perceptual.resolve_lpips_backbone("pretrained")
    assert calls == ["vgg", "alex"]
    path = perceptual.vgg16_weights_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # a cached checkpoint is used even when offline
    assert perceptual.resolve_lpips_backbone("auto") is True
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("QLIP_OFFLINE", "true")
    assert perceptual.offline_mode()
    monkeypatch.setenv("QLIP_OFFLINE", "0")
    assert not perceptual.offline_mode()


def test_offline_auto_refuses_and_random_warns_once_without_hanging(tmp_path):
    """Fresh interpreter, empty torch hub, HF_HUB_OFFLINE=1: ``auto`` refuses with one line (never
    a silent random trunk); the explicit ``random`` opt-in builds, with one warning for two."""
    code = (
        "import warnings\n"
        "from qlip.errors import QLIPError\n"
        "from qlip.losses import PerceptualLoss, LPIPSRandomBackboneWarning\n"
        "try:\n"
        "    PerceptualLoss()\n"
        "    raise SystemExit('auto built without weights')\n"
        "except QLIPError as e:\n"
        "    assert '\\n' not in str(e), str(e)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    a = PerceptualLoss(backbone='random'); b = PerceptualLoss(backbone='random')\n"
        "ours = [x for x in w if issubclass(x.category, LPIPSRandomBackboneWarning)]\n"
        "others = [str(x.message) for x in w if x not in ours]\n"
        "assert len(ours) == 1, ours\n"
        "assert 'NOT comparable' in str(ours[0].message)\n"
        "assert not a.pretrained_backbone and not b.pretrained_backbone\n"
        "print('OK', others)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ":".join(p for p in sys.path if p)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("OK []"), res.stdout
