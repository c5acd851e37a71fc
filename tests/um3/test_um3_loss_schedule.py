"""Eq. 6 (separate softmax) and Eq. 7 (calm-down schedule) against their direct formulas."""
import math

import pytest
import torch

from qlip.errors import ConfigError
from qlip.um3.loss import IGNORE, joint_softmax_nll, restrict_logits, split_softmax_nll
from qlip.um3.schedule import text_fraction, text_rows


def test_split_softmax_is_eq6_per_position():
    torch.manual_seed(0)
    V, split = 11, 6
    logits = torch.randn(3, 5, V) * 3
    targets = torch.randint(0, V, (3, 5))
    targets[0, 0], targets[1, 2], targets[2, 4] = IGNORE, 0, V - 1
    got = split_softmax_nll(logits, targets, split)
    for b in range(3):
        for t in range(5):
            y = int(targets[b, t])
            if y == IGNORE:
                assert got[b, t] == 0
                continue
            x = logits[b, t].double()
            group = range(0, split) if y < split else range(split, V)  # 1[i <= V_t] ... 1[i > V_t]
            want = -math.log(math.exp(x[y]) / sum(math.exp(x[j]) for j in group))
            assert abs(float(got[b, t]) - want) < 1e-5, (b, t)


def test_split_softmax_differs_from_joint_and_joint_is_plain_cross_entropy():
    torch.manual_seed(1)
    logits, targets = torch.randn(2, 4, 9), torch.randint(0, 9, (2, 4))
    joint = joint_softmax_nll(logits, targets, 5)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 4)
    assert torch.allclose(joint, want, atol=1e-6)
    split = split_softmax_nll(logits, targets, 5)
    assert (split < joint - 1e-6).all()  # a softmax over a subset gives the target more mass


def test_split_softmax_gradient_stays_in_the_target_group():
    logits = torch.randn(1, 1, 8, requires_grad=True)
    split_softmax_nll(logits, torch.tensor([[6]]), 5).sum().backward()
    assert (logits.grad[0, 0, :5] == 0).all() and (logits.grad[0, 0, 5:] != 0).all()


def test_restrict_logits():
    out = restrict_logits(torch.arange(6.0)[None], 2, 4)
    assert out[0, 2:4].tolist() == [2.0, 3.0] and torch.isinf(out[0, [0, 1, 4, 5]]).all()


@pytest.mark.parametrize("r0,rT,T", [(0.6, 0.2, 100), (0.9, 0.5, 7)])
def test_calm_down_is_eq7(r0, rT, T):
    for t in range(0, 3 * T):
        want = (rT - r0) / T * (t - T) + rT if t <= T else rT
        assert text_fraction(t, r0, rT, T) == pytest.approx(want, abs=1e-12)
    assert text_fraction(0, r0, rT, T) == pytest.approx(r0) and text_fraction(T, r0, rT, T) == pytest.approx(rT)
    assert text_fraction(T // 2, r0, rT, T, "constant") == rT
    assert text_rows(0, 10, r0, rT, T) == round(10 * r0)


def test_unknown_schedule_fails():
    with pytest.raises(ConfigError, match="calm_down"):
        text_fraction(0, 0.5, 0.2, 10, "cosine")
