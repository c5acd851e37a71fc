"""PSNR / SSIM against scikit-image, Frechet distance against a direct scipy computation."""
import numpy as np
import pytest
import torch
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from qlip.errors import QLIPError
from qlip.eval.recon import (FeatureStats, ReconMetrics, evaluate_reconstruction, frechet_distance,
                             psnr_per_image, reference_stats_path, ssim_per_image)


def _pairs(seed=0, b=3, h=32, w=40):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, h, w, generator=g)
    y = (x + 0.1 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)
    return x, y


def test_psnr_matches_skimage_per_image():
    x, y = _pairs()
    ours = psnr_per_image(y, x)
    for i in range(len(x)):
        ref = peak_signal_noise_ratio(x[i].double().numpy(), y[i].double().numpy(), data_range=1.0)
        assert abs(float(ours[i]) - ref) < 0.01
    # the value torchmetrics gives (written out in qlip: its import costs seconds), inf when exact
    from torchmetrics.functional.image import peak_signal_noise_ratio as tm_psnr
    torch.testing.assert_close(ours, tm_psnr(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3)))
    assert torch.isinf(psnr_per_image(x, x)).all()
    with pytest.raises(ValueError, match="one shape"):
        psnr_per_image(y, x[:, :, :-1])


def _photos(size):
    """skimage's astronaut / coffee / chelsea, centre-cropped square and resized to ``size``."""
    import skimage.data
    from PIL import Image

    out = []
    for name in ("astronaut", "coffee", "chelsea"):
        img = getattr(skimage.data, name)()
        h, w = img.shape[:2]
        s = min(h, w)
        img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
        out.append(torch.from_numpy(img).permute(2, 0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_ssim_and_psnr_match_skimage_on_real_photos(size):
    """The paper's SSIM protocol (valid Gaussian window, as pytorch-msssim) equals scikit-image's
    on real photos, blurred and noisy; torchmetrics' padded-border SSIM does not (up to 0.02)."""
    x = _photos(size)
    g = torch.Generator().manual_seed(size)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    noisy = (x + 0.08 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    for y in (blurred, noisy):
        ours, psnr = ssim_per_image(y, x), psnr_per_image(y, x)
        for i in range(len(x)):
            a, b = x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy()
            ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=1.0, channel_axis=2)
            assert abs(float(ours[i]) - ref) < 1e-4, (size, i, float(ours[i]), ref)
            assert abs(float(psnr[i]) - peak_signal_noise_ratio(a, b, data_range=1.0)) < 0.01
    with pytest.raises(QLIPError, match="at least 11 px"):
        ssim_per_image(x[:, :, :8, :8], x[:, :, :8, :8])


def test_frechet_distance_matches_sqrtm_when_rank_deficient():
    """rFID on fewer images than feature dimensions: singular covariances, still pytorch-fid's value."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(24, 64)) * 1.3 + 0.2
    m1, c1, m2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    direct = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(linalg.sqrtm(c1 @ c2).real))
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(direct, rel=1e-6)


def test_frechet_distance_matches_direct_sqrtm_and_streaming_stats():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 16))
    b = rng.normal(size=(250, 16)) @ rng.normal(size=(16, 16)) * 0.3 + 0.5
    sa, sb = FeatureStats(), FeatureStats()
    for chunk in np.array_split(a, 7):  # streaming in uneven batches
        sa.update(torch.from_numpy(chunk))
    for chunk in np.array_split(b, 3):
        sb.update(chunk)
    mu1, s1 = sa.compute()
    mu2, s2 = sb.compute()
    np.testing.assert_allclose(mu1, a.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-9, atol=1e-12)
    # direct computation from the raw features
    m1, c1, m2, c2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    direct = float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(linalg.sqrtm(c1 @ c2).real))
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(direct, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(QLIPError):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def test_feature_stats_cache_roundtrip(tmp_path):
    st = FeatureStats()
    st.update(torch.randn(20, 5))
    p = reference_stats_path(tmp_path, "fingerprint", 32, "toy")
    assert p != reference_stats_path(tmp_path, "fingerprint", 64, "toy")
    assert p != reference_stats_path(tmp_path, "fingerprint", 32, "other")
    st.save(p, meta={"x": 1})
    back = FeatureStats.load(p)
    for u, v in zip(st.compute(), back.compute()):
        np.testing.assert_allclose(u, v)


class _MeanColour:
    """Toy feature extractor: mean and std of each channel."""
    name = "toy-mean-colour"

    def __call__(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


class _IdentityTokenizer(torch.nn.Module):
    """Stands in for a model: 'reconstructs' by adding a fixed offset; ids are pixel-derived."""
    image_mean, image_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def tokenize(self, x):
        return (x[:, 0, ::8, ::8] > 0).long()

    def detokenize(self, ids):
        return self._x * 0.9


def test_recon_metrics_streaming_with_custom_extractor():
    x, y = _pairs(2, b=6)
    m = ReconMetrics(lpips_net=None, feature_extractor=_MeanColour())
    m.update(x[:4], y[:4])
    m.update(x[4:], y[4:])
    out = m.compute()
    assert out["n"] == 6 and out["rfid"] >= 0
    assert out["psnr"] == pytest.approx(float(psnr_per_image(y, x).mean()), rel=1e-6)
    assert out["ssim"] == pytest.approx(float(ssim_per_image(y, x).mean()), rel=1e-6)
    same = ReconMetrics(lpips_net=None, feature_extractor=_MeanColour())
    same.update(x, x)
    assert same.compute()["rfid"] == pytest.approx(0.0, abs=1e-8)


def test_evaluate_reconstruction_unnormalises_and_keeps_samples():
    model = _IdentityTokenizer()
    x01, _ = _pairs(3, b=4)
    xn = (x01 - 0.5) / 0.25
    model._x = xn
    out, samples = evaluate_reconstruction(model, [(xn, torch.zeros(4))],
                                           metrics=ReconMetrics(lpips_net=None), keep=2)
    expected = psnr_per_image(((xn * 0.9) * 0.25 + 0.5).clamp(0, 1), x01).mean()
    assert out["psnr"] == pytest.approx(float(expected), rel=1e-5)
    assert samples["originals"].shape == (2, 3, 32, 40)
    assert float(samples["reconstructions"].min()) >= 0.0
