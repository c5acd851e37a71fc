import pytest
import torch

from qlip.errors import QLIPError
from qlip.losses import ReconstructionLoss, balanced_loss_weights, compute_loss_weights_ratio, reconstruction_loss


def test_mse_and_l1_values():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full_like(a, 2.0)
    assert reconstruction_loss(a, b).item() == pytest.approx(4.0)
    assert reconstruction_loss(a, b, "l1").item() == pytest.approx(2.0)
    assert ReconstructionLoss()(a, b).item() == pytest.approx(4.0)
    with pytest.raises(ValueError):
        ReconstructionLoss("l2")
    with pytest.raises(ValueError):
        reconstruction_loss(a, b[:1])


def test_loss_weight_ratio():
    assert compute_loss_weights_ratio(2.0, 0.002) == pytest.approx(1000.0)
    assert balanced_loss_weights(2.0, 0.002, align_weight=0.5) == pytest.approx((500.0, 0.5))
    for bad in (0.0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(QLIPError):
            compute_loss_weights_ratio(bad, 1.0)
