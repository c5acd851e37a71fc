"""Adversarial loss for stage 2: PatchGAN discriminator, hinge / non-saturating losses, R1, warm-up.

The paper (Table 8) trains the discriminator with AdamW at lr 1e-4 and uses a fixed generator
GAN weight ``alpha_g = 0.1`` (no VQGAN-style adaptive weight). It does not name the
discriminator; we use the **PatchGAN** of pix2pix / taming-transformers (``NLayerDiscriminator``):
strided 4x4 convolutions with LeakyReLU(0.2), giving a grid of per-patch real/fake logits
(30x30 for 256x256 inputs with 3 layers). Defaults: hinge loss, GroupNorm (batch-independent,
unlike taming's BatchNorm, so real and fake batches and data-parallel ranks do not interact and
R1 is well defined), no R1. BSQ-ViT (the stage-2 anchor) instead uses a StyleGAN2-style
discriminator with the non-saturating loss and R1 (gamma 10, every 16 steps); both the loss
kind and R1 are options here.

Losses (``r``, ``f``: discriminator logits on real and generated images; means over all logits):

* hinge:           ``d = 0.5 * (mean(relu(1 - r)) + mean(relu(1 + f)))``,  ``g = -mean(f)``
* non_saturating:  ``d = 0.5 * (mean(softplus(-r)) + mean(softplus(f)))``, ``g = mean(softplus(-f))``
* R1 (Mescheder et al. 2018): ``mean_b ||d sum(D(x_real)) / d x_real||^2``, added to the
  discriminator loss as ``gamma / 2 * R1`` (times ``r1_every`` with lazy regularisation).

Feed the discriminator images in the same range as the decoder output target (``[-1, 1]``
recommended, as LPIPS).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchDiscriminator", "AdversarialLoss", "d_loss", "g_loss", "r1_penalty", "GAN_KINDS"]

GAN_KINDS = ("hinge", "non_saturating")


def _check_kind(kind: str) -> None:
    if kind not in GAN_KINDS:
        raise ValueError(f"GAN loss kind must be one of {GAN_KINDS}, got {kind!r}")


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss (minimised by D); see the module docstring for the formulas."""
    _check_kind(kind)
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())
    return 0.5 * (F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean())


def g_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator adversarial loss (minimised by the autoencoder)."""
    _check_kind(kind)
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> torch.Tensor:
    """R1 gradient penalty ``mean_b ||grad_x sum D(x)||^2``; ``real_images`` must require grad
    and ``real_logits`` must be computed from them. Keeps the graph (it is part of the D loss)."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.pow(2).reshape(grad.shape[0], -1).sum(dim=1).mean()


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "group":
        groups = 32
        while channels % groups:
            groups //= 2
        return nn.GroupNorm(groups, channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'group', 'batch', 'instance' or 'none', got {norm!r}")


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / taming ``NLayerDiscriminator`` layout).

    ``conv(4, s2) -> LReLU``, then ``num_layers - 1`` blocks ``conv(4, s2) -> norm -> LReLU``
    doubling channels (capped at ``base_channels * max_channel_mult``), one ``conv(4, s1) ->
    norm -> LReLU`` block and a final ``conv(4, s1)`` to one logit channel. Output
    ``(B, 1, h, w)`` with ``h = H / 2**num_layers - 2`` for ``H`` divisible by ``2**num_layers``.
    Weights: N(0, 0.02) convolutions, norm scales N(1, 0.02) (DCGAN/taming init).
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        num_layers: int = 3,
        norm: str = "group",
        max_channel_mult: int = 8,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        use_bias = norm == "none"
        layers = [nn.Conv2d(in_channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, max_channel_mult)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(base_channels * prev, base_channels * mult, 4, stride, 1, bias=use_bias),
                _norm_layer(norm, base_channels * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(base_channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


@contextmanager
def _frozen(module: nn.Module):
    """Temporarily stop a module's parameters from recording gradients."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class AdversarialLoss(nn.Module):
    """Discriminator + loss kind + fixed generator weight + warm-up + optional lazy R1.

    Args:
        discriminator: default ``PatchDiscriminator()``.
        kind: ``"hinge"`` (default) or ``"non_saturating"``.
        weight: fixed generator GAN weight (paper: 0.1; no adaptive weight).
        start_step: the discriminator is trained from this step on; before it the generator
            weight is 0 and :meth:`generator_loss` returns a constant 0 without running D.
        r1_gamma: R1 weight ``gamma`` (0 = off; BSQ-ViT uses 10).
        r1_every: lazy regularisation interval: R1 is computed on steps ``step % r1_every == 0``
            and scaled by ``r1_every`` to keep its average strength.

    Training step (the trainer owns the optimisers)::

        g_total = ... + adv.generator_loss(fake, step)            # weighted, D params untouched
        if adv.discriminator_active(step):
            d_total, stats = adv.discriminator_loss(real, fake, step)  # fake is detached inside
            d_opt.zero_grad(); d_total.backward(); d_opt.step()

    :meth:`generator_loss` runs D with its parameters' ``requires_grad`` switched off, so the
    generator backward leaves no gradient in D (gradients still reach ``fake``). With DDP on
    the discriminator, call the underlying module for the generator pass.
    """

    def __init__(
        self,
        discriminator: Optional[nn.Module] = None,
        kind: str = "hinge",
        weight: float = 0.1,
        start_step: int = 0,
        r1_gamma: float = 0.0,
        r1_every: int = 16,
    ):
        super().__init__()
        _check_kind(kind)
        if r1_every < 1:
            raise ValueError(f"r1_every must be >= 1, got {r1_every}")
        self.discriminator = discriminator if discriminator is not None else PatchDiscriminator()
        self.kind = kind
        self.weight = float(weight)
        self.start_step = int(start_step)
        self.r1_gamma = float(r1_gamma)
        self.r1_every = int(r1_every)

    def discriminator_active(self, step: int) -> bool:
        """Whether the discriminator is trained (and the generator GAN term is on) at ``step``."""
        return step >= self.start_step

    def generator_weight(self, step: int) -> float:
        """``weight`` once the discriminator is active, 0 during the warm-up."""
        return self.weight if self.discriminator_active(step) else 0.0

    def generator_loss(self, fake_images: torch.Tensor, step: int) -> torch.Tensor:
        """Weighted generator GAN loss ``generator_weight(step) * g_loss(D(fake))``."""
        w = self.generator_weight(step)
        if w == 0.0:
            return fake_images.new_zeros(())
        with _frozen(self.discriminator):
            logits = self.discriminator(fake_images)
        return w * g_loss(logits, self.kind)

    def discriminator_loss(
        self, real_images: torch.Tensor, fake_images: torch.Tensor, step: int
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Discriminator loss (+ lazy R1 on due steps) and detached stats for logging."""
        real = real_images.detach()
        apply_r1 = self.r1_gamma > 0 and step % self.r1_every == 0
        if apply_r1:
            real.requires_grad_(True)
        real_logits = self.discriminator(real)
        fake_logits = self.discriminator(fake_images.detach())
        loss = d_loss(real_logits, fake_logits, self.kind)
        stats = {
            "d_loss": loss.detach(),
            "logits_real": real_logits.detach().mean(),
            "logits_fake": fake_logits.detach().mean(),
        }
        if apply_r1:
            r1 = r1_penalty(real_logits, real)
            loss = loss + 0.5 * self.r1_gamma * self.r1_every * r1
            stats["r1"] = r1.detach()
        return loss, stats
