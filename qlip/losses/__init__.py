"""Training losses of QLIP (see docs/losses.md).

Stage 1: ``alpha_r * MSE + alpha_q * BSQ + alpha_a * contrastive`` (contrastive possibly with
gradient caching); stage 2: ``MSE + BSQ + 0.1 * LPIPS + 0.1 * GAN`` with the encoder frozen.
The BSQ loss itself lives with the quantiser (``qlip.quant``).
"""

from qlip.losses.balancing import balanced_loss_weights, compute_loss_weights_ratio
from qlip.losses.contrastive import ContrastiveLoss, clamp_logit_scale_, gather_with_grad
from qlip.losses.gan import AdversarialLoss, PatchDiscriminator, d_loss, g_loss, r1_penalty
from qlip.losses.gradcache import GradCacheOutput, grad_cache_step
from qlip.losses.perceptual import LPIPSRandomBackboneWarning, PerceptualLoss, normalized_to_pm1
from qlip.losses.reconstruction import ReconstructionLoss, reconstruction_loss
from qlip.losses.semantic import embedding_consistency_loss

__all__ = [
    "ContrastiveLoss",
    "clamp_logit_scale_",
    "gather_with_grad",
    "grad_cache_step",
    "GradCacheOutput",
    "PerceptualLoss",
    "LPIPSRandomBackboneWarning",
    "normalized_to_pm1",
    "PatchDiscriminator",
    "AdversarialLoss",
    "d_loss",
    "g_loss",
    "r1_penalty",
    "ReconstructionLoss",
    "reconstruction_loss",
    "embedding_consistency_loss",
    "compute_loss_weights_ratio",
    "balanced_loss_weights",
]
