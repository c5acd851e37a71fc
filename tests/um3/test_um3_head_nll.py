"""``head_nll`` (logits only at target positions, per group) equals Eq. 6 / the joint softmax on
full logits, values and gradients; the model's ``nll`` / ``next_logits`` equal its full forward."""
import pytest
import torch

from qlip.um3.loss import IGNORE, LOSSES, head_nll


@pytest.mark.parametrize("softmax", ["split", "joint"])
def test_head_nll_equals_the_full_logits_loss(softmax):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (3, 7))
    t[0, :3] = IGNORE
    t[1, 0], t[2, 0] = 5, 6  # the last text row and the first visual row
    got = head_nll(h, w, t, 6, softmax)
    want = LOSSES[softmax](h @ w.T, t, 6)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert (got[0, :3] == 0).all()
    g1 = torch.autograd.grad(got.sum(), (h, w))
    g2 = torch.autograd.grad(want.sum(), (h, w))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_model_nll_and_next_logits_match_the_forward(tmp_path):
    from _um3_utils import tiny_llama
    from qlip.um3.model import from_llama
    model, _ = from_llama(tiny_llama(tmp_path / "llama"), bits=8, groups=2)
    v = model.vocab
    torch.manual_seed(1)
    x = torch.randint(0, v.size, (2, 9))
    y = torch.randint(0, v.size, (2, 9))
    y[0, 4:] = IGNORE
    with torch.no_grad():
        logits = model(x)
        assert torch.allclose(model.nll(x, y, "split"), LOSSES["split"](logits, y, v.visual_start), atol=1e-5)
        assert torch.allclose(model.nll(x, y, "joint"), LOSSES["joint"](logits, y, v.visual_start), atol=1e-5)
        assert torch.allclose(model.next_logits(x), logits[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="softmax"):
        head_nll(torch.zeros(1, 1, 2), torch.zeros(3, 2), torch.zeros(1, 1, dtype=torch.long), 1, "other")
