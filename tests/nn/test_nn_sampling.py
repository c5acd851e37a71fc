"""Sampling helpers: top-k, top-p, temperature, reproducibility, classifier-free guidance."""
import math

import pytest
import torch

from qlip.nn import cfg_logits, sample, top_k_filter, top_p_filter


def test_top_k_keeps_exactly_k():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 50)
    out = top_k_filter(logits, 5)
    kept = torch.isfinite(out)
    assert (kept.sum(-1) == 5).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter_(-1, logits.topk(5, -1).indices, True))
    assert torch.equal(out[kept], logits[kept])
    ties = top_k_filter(torch.zeros(4, 10), 3)                     # all equal: still exactly 3
    assert (torch.isfinite(ties).sum(-1) == 3).all()
    assert torch.equal(top_k_filter(logits, None), logits) and torch.equal(top_k_filter(logits, 99), logits)


def test_top_p_keeps_the_minimal_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])                   # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    for p, n in [(0.01, 1), (0.4, 1), (0.7, 2), (0.9, 3), (0.99, 4)]:
        assert torch.isfinite(top_p_filter(logits, p)).sum().item() == n, p
    assert torch.equal(torch.isfinite(top_p_filter(logits, 0.7)), torch.tensor([False, True, False, True]))
    # random batched rows: kept mass >= p and dropping the least likely kept token falls below p
    torch.manual_seed(0)
    logits = torch.randn(6, 40) * 2
    for p in (0.3, 0.8, 0.95):
        kept = torch.isfinite(top_p_filter(logits, p))
        probs = logits.softmax(-1)
        mass = (probs * kept).sum(-1)
        smallest = torch.where(kept, probs, torch.ones_like(probs)).min(-1).values
        assert (mass >= p - 1e-6).all() and (mass - smallest < p).all()
        # the kept tokens are the most likely ones
        assert (torch.where(kept, probs, 2.0).min(-1).values >= torch.where(kept, -1.0, probs).max(-1).values).all()


def test_temperature_zero_is_argmax_and_generator_is_reproducible():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 30)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=1.0, top_k=1), logits.argmax(-1))
    a = sample(logits, 1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = sample(logits, 1.0, top_k=10, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 4) and a.dtype == torch.long and torch.equal(a, b)
    draws = torch.stack([sample(logits, 1.0, generator=torch.Generator().manual_seed(s)) for s in range(20)])
    assert len(torch.unique(draws[:, 0, 0])) > 1                 # not deterministic across seeds
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, temperature=-1.0)


def test_sampled_ids_respect_filters_and_temperature():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(2000, 5)
    ids = sample(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 1}
    frac = (ids == 0).float().mean().item()
    assert abs(frac - 1 / (1 + math.exp(-1))) < 0.05             # softmax of (4, 3) over the top 2
    hot = sample(logits, 100.0, generator=torch.Generator().manual_seed(0))
    assert len(set(hot.tolist())) == 5                              # a high temperature flattens


def test_classifier_free_guidance_on_logits():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 11), torch.randn(2, 11)
    torch.testing.assert_close(cfg_logits(cond, uncond, 1.0), cond)
    assert torch.equal(cfg_logits(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(cfg_logits(cond, uncond, 3.0), 3 * cond - 2 * uncond)
    cond[0, 0] = uncond[0, 0] = float("-inf")                      # masked in both stays masked
    out = cfg_logits(cond, uncond, 4.0)
    assert out[0, 0] == float("-inf") and torch.isfinite(out.flatten()[1:]).all()
