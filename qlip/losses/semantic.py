"""Embedding-consistency loss for stage 2: the reconstruction must keep what the frozen encoder reads.

QLIP's point is that its tokens keep the semantics of the image. Stage 2 fine-tunes only the
bottleneck and decoder, with pixel (MSE), perceptual (LPIPS) and adversarial terms: none of them
asks the decoder to render the details that the *text-aligned encoder* relies on (at the demo's
scale: the outline that tells a circle from a square). This term does, with the stage-2 model's
own frozen vision encoder ``E`` and its pooled, normalised image embedding ``e(.)`` (the one the
zero-shot classifier uses)::

    L_sem = mean_i ( 1 - cos( e(E(x_hat_i)), sg(e(E(x_i))) ) )

It is zero when the reconstruction equals the input, lies in [0, 2], and sends gradients to the
reconstruction only (the encoder is frozen in stage 2; the reference embedding is detached).
Not in the paper (its stage 2 is MSE + BSQ + LPIPS + GAN); off by default (``loss.alpha_s = 0``).
It plays the role LPIPS's ImageNet trunk plays at scale, with the encoder's own features, which
is what is available offline (LPIPS then runs on a random trunk). docs/losses.md and
docs/demo.md measure what it does.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def embedding_consistency_loss(embed: Callable[[torch.Tensor], torch.Tensor], recon: torch.Tensor,
                               reference: torch.Tensor) -> torch.Tensor:
    """``embed``: images -> (B, D) embeddings or (B, N, D) token features (normalised or not);
    ``recon``: the reconstructions (the same normalisation as the encoder's input); ``reference``:
    the same features of the originals (detached here). Returns the cosine distance along the last
    dimension, averaged over images (and tokens), a scalar."""
    if recon.shape[0] != reference.shape[0]:
        raise ValueError(f"recon has {recon.shape[0]} images but reference has {reference.shape[0]} embeddings")
    e = F.normalize(embed(recon).float(), dim=-1)
    ref = F.normalize(reference.detach().float(), dim=-1)
    if e.shape != ref.shape:
        raise ValueError(f"embedding shapes differ: recon {tuple(e.shape)} vs reference {tuple(ref.shape)}")
    return (1.0 - (e * ref).sum(-1)).mean()
