import math

import pytest
import torch
import torch.nn.functional as F

from qlip.losses import ContrastiveLoss, clamp_logit_scale_


def direct_clip_loss(v, w, scale):
    """Textbook symmetric InfoNCE written with explicit loops."""
    n = v.shape[0]
    total = 0.0
    for i in range(n):
        row = torch.stack([scale * v[i] @ w[j] for j in range(n)])
        col = torch.stack([scale * v[j] @ w[i] for j in range(n)])
        total = total - torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    return total / (2 * n)


def test_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    w = F.normalize(torch.randn(6, 5, generator=g, dtype=torch.float64), dim=-1)
    loss = ContrastiveLoss()(v, w, torch.tensor(10.0, dtype=torch.float64))
    torch.testing.assert_close(loss, direct_clip_loss(v, w, 10.0), atol=1e-12, rtol=0)


def test_perfect_alignment_with_large_scale_is_near_zero_and_float_scale_ok():
    v = torch.eye(4)
    assert ContrastiveLoss()(v, v, 100.0).item() < 1e-6
    # uniform logits -> log(n)
    z = torch.zeros(4, 3)
    assert ContrastiveLoss()(z, z, 1.0).item() == pytest.approx(math.log(4))


def test_gradient_reaches_logit_scale_param_and_bf16_is_upcast():
    param = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    g = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(4, 3, generator=g), dim=-1).bfloat16()
    w = F.normalize(torch.randn(4, 3, generator=g), dim=-1).bfloat16()
    loss = ContrastiveLoss()(v, w, param.exp())
    assert loss.dtype == torch.float32
    loss.backward()
    assert param.grad is not None and torch.isfinite(param.grad)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        ContrastiveLoss()(torch.zeros(3, 4), torch.zeros(2, 4), 1.0)


def test_distributed_true_without_process_group_raises():
    with pytest.raises(RuntimeError):
        ContrastiveLoss(distributed=True)(torch.zeros(2, 4), torch.zeros(2, 4), 1.0)


def test_clamp_logit_scale():
    p = torch.nn.Parameter(torch.tensor(7.0))
    out = clamp_logit_scale_(p)
    assert out is p and p.item() == pytest.approx(math.log(100.0))
    p.data.fill_(-1.0)
    clamp_logit_scale_(p)
    assert p.item() == 0.0
    p.data.fill_(1.0)
    clamp_logit_scale_(p, max=0.5)
    assert p.item() == 0.5


def test_hard_negative_captions_are_extra_image_to_text_columns():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    neg = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    got = ContrastiveLoss(distributed=False)(img, txt, 10.0, text_negatives=neg)
    labels = torch.arange(5)
    i2t = torch.nn.functional.cross_entropy(10.0 * img @ torch.cat([txt, neg]).T, labels)
    t2i = torch.nn.functional.cross_entropy(10.0 * txt @ img.T, labels)
    torch.testing.assert_close(got, 0.5 * (i2t + t2i), rtol=1e-12, atol=1e-12)
    # extra columns in the softmax can only raise the loss
    assert got > ContrastiveLoss(distributed=False)(img, txt, 10.0)
    with pytest.raises(ValueError, match="text_negatives"):
        ContrastiveLoss(distributed=False)(img, txt, 10.0, text_negatives=neg[:3])
