"""Stage-2 embedding-consistency loss: 1 - cos(E(x_hat), sg(E(x))) through a frozen encoder."""
import pytest
import torch
from torch import nn

from qlip.losses import embedding_consistency_loss


def _encoder():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.GELU(), nn.Flatten(), nn.LazyLinear(16))
    enc(torch.zeros(1, 3, 16, 16))
    return enc.requires_grad_(False)


def test_zero_at_identity_and_matches_the_formula():
    enc = _encoder()
    x = torch.randn(4, 3, 16, 16)
    assert embedding_consistency_loss(enc, x.clone(), enc(x)).abs().item() < 1e-6
    y = x + 0.5 * torch.randn_like(x)
    a, b = enc(y), enc(x)
    want = (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean()
    got = embedding_consistency_loss(enc, y, b)
    assert torch.allclose(got, want, atol=1e-6) and 0 < got.item() <= 2


def test_gradient_reaches_the_reconstruction_only():
    enc = _encoder()
    x = torch.randn(2, 3, 16, 16)
    ref = enc(x).requires_grad_(True)
    y = (x + torch.randn_like(x)).requires_grad_(True)
    embedding_consistency_loss(enc, y, ref).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert ref.grad is None  # reference detached
    assert all(p.grad is None for p in enc.parameters())
    # a gradient step on the reconstruction brings its embedding closer
    with torch.no_grad():
        before = embedding_consistency_loss(enc, y, ref).item()
        after = embedding_consistency_loss(enc, y - 0.5 * y.grad / y.grad.norm(), ref).item()
    assert after < before


def test_mismatched_inputs_are_named():
    enc = _encoder()
    with pytest.raises(ValueError, match="recon has 3 images but reference has 2"):
        embedding_consistency_loss(enc, torch.randn(3, 3, 16, 16), torch.randn(2, 16))
    with pytest.raises(ValueError, match="embedding shapes differ"):
        embedding_consistency_loss(enc, torch.randn(2, 3, 16, 16), torch.randn(2, 8))


def test_token_features_average_over_tokens():
    torch.manual_seed(1)
    proj = nn.Linear(12, 6).requires_grad_(False)

    def tokens(x):  # (B, 3, 4, 4) images -> (B, 16, 6) token features
        return proj(torch.cat([x, x ** 2, x.sin(), x.cos()], 1).flatten(2).transpose(1, 2))

    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a, b = tokens(y), tokens(x)
    want = (1 - torch.nn.functional.cosine_similarity(a, b, dim=-1)).mean()
    assert torch.allclose(embedding_consistency_loss(tokens, y, b), want, atol=1e-6)
    assert embedding_consistency_loss(tokens, x, b).abs().item() < 1e-6
