import math

import pytest
import torch

from qlip.losses import AdversarialLoss, PatchDiscriminator, d_loss, g_loss, r1_penalty


def test_hinge_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = [0, 0.5, 2] -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = [0, 1, 2]  -> mean 1
    assert d_loss(real, fake, "hinge").item() == pytest.approx(0.5 * (5 / 6 + 1))
    assert g_loss(fake, "hinge").item() == pytest.approx(1 / 3)  # -mean(f)
    # a confident, correct discriminator has zero hinge loss
    assert d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


def test_non_saturating_values_and_signs():
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731 softplus
    real, fake = torch.tensor([1.0, -1.0]), torch.tensor([0.0, 2.0])
    expected_d = 0.5 * ((sp(-1) + sp(1)) / 2 + (sp(0) + sp(2)) / 2)
    assert d_loss(real, fake, "non_saturating").item() == pytest.approx(expected_d)
    assert g_loss(fake, "non_saturating").item() == pytest.approx((sp(0) + sp(-2)) / 2)
    # generator loss decreases as the fake logits grow (the generator wants "real")
    assert g_loss(torch.tensor([3.0]), "non_saturating") < g_loss(torch.tensor([-3.0]), "non_saturating")
    assert g_loss(torch.tensor([3.0]), "hinge") < g_loss(torch.tensor([-3.0]), "hinge")
    with pytest.raises(ValueError):
        d_loss(real, fake, "wgan")


@pytest.mark.parametrize("norm", ["group", "batch", "instance", "none"])
def test_patch_discriminator_shape(norm):
    d = PatchDiscriminator(base_channels=8, num_layers=3, norm=norm)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 64 // 8 - 2, 64 // 8 - 2)
    assert PatchDiscriminator(base_channels=8, num_layers=2)(torch.randn(1, 3, 32, 48)).shape == (1, 1, 6, 10)


def test_r1_penalty_of_linear_discriminator():
    # D(x) = sum(w * x) has gradient w for every sample -> R1 = ||w||^2
    w = torch.randn(3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).flatten(1).sum(1)
    torch.testing.assert_close(r1_penalty(logits, x), w.pow(2).sum())


def test_adversarial_loss_warmup_freezing_and_r1():
    torch.manual_seed(0)
    adv = AdversarialLoss(PatchDiscriminator(base_channels=8, num_layers=2), weight=0.1, start_step=10, r1_gamma=10.0, r1_every=4)
    fake = torch.randn(2, 3, 32, 32, requires_grad=True)
    real = torch.randn(2, 3, 32, 32)

    assert not adv.discriminator_active(9) and adv.generator_weight(9) == 0.0
    assert adv.generator_loss(fake, 9).item() == 0.0
    assert adv.discriminator_active(10) and adv.generator_weight(10) == 0.1

    g = adv.generator_loss(fake, 10)
    with torch.no_grad():
        expected = 0.1 * g_loss(adv.discriminator(fake), "hinge")
    torch.testing.assert_close(g, expected)
    g.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for p in adv.discriminator.parameters())  # D untouched by the G step
    assert all(p.requires_grad for p in adv.discriminator.parameters())  # and unfrozen afterwards

    loss_no_r1, stats = adv.discriminator_loss(real, fake, step=11)
    assert "r1" not in stats
    loss_r1, stats = adv.discriminator_loss(real, fake, step=12)
    assert "r1" in stats
    torch.testing.assert_close(loss_r1, stats["d_loss"] + 0.5 * 10.0 * 4 * stats["r1"])
    loss_r1.backward()
    assert fake.grad.abs().sum() > 0
    assert all(p.grad is not None for p in adv.discriminator.parameters())
