"""Symmetric InfoNCE (CLIP) loss with a gradient-carrying all-gather.

The loss for one process holding ``n`` of the ``N`` image/text pairs of a global batch is::

    logits_img = s * v_local @ w_all.T        # (n, N)
    logits_txt = s * w_local @ v_all.T        # (n, N)
    labels     = arange(n) + offset_of_this_rank
    loss_rank  = 0.5 * (CE_sum(logits_img, labels) + CE_sum(logits_txt, labels)) * W / N

``W`` is the world size and ``s`` the (already exponentiated) logit scale. Averaging
``loss_rank`` over the ranks gives exactly the single-process CLIP loss on the global batch,
``0.5 * (CE_mean(s V W^T) + CE_mean(s W V^T))``. The gathered features keep their autograd
graph: the backward of the gather sums the gradients of all ranks into the owner's rows
(:func:`qlip.nn.collectives.gather_with_grad`, shared with the BSQ codebook entropy).
Hence the parameter gradients averaged over ranks (what DDP does, or
:func:`qlip.nn.collectives.all_reduce_gradients_`) equal the single-process gradients.
Memory is ``n x N`` logits per rank, as in open_clip's ``ClipLoss(local_loss=True,
gather_with_grad=True)``. Ranks may hold different ``n`` (the sizes are exchanged first).

The paper writes Eq. (2) as a sum of log-probabilities without the minus sign; the
implementation is the usual minimised form (negative log-likelihood, averaged over the batch
and over the two directions).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.collectives import distributed_world, exchange_sizes, gather_with_grad, resolve_world

__all__ = ["ContrastiveLoss", "clamp_logit_scale_", "gather_with_grad", "distributed_world"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) loss, exact under data parallelism.

    Args:
        distributed: ``None`` (default) gathers across ranks when torch.distributed is
            initialised with world size > 1; ``False`` always computes the local loss only
            (e.g. a reference computation); ``True`` requires an initialised process group.
        group: process group for the gather (default: the world group).

    Call ``loss(image_features, text_features, logit_scale)`` with L2-normalised ``(n, P)``
    features (row ``i`` of both is a pair) and ``logit_scale`` = ``exp(model.logit_scale)``
    (tensor or float). fp16/bf16 features are up-cast to fp32 for the logits. Returns the scalar
    loss of this rank; the mean over ranks is the global-batch loss (all-reduce it for logging).
    Every rank must call the loss and its backward (collectives run in both).
    """

    def __init__(self, distributed: Optional[bool] = None, group=None):
        super().__init__()
        self.distributed = distributed
        self.group = group

    def _world(self) -> Tuple[int, int]:
        return resolve_world(self.distributed, self.group, "ContrastiveLoss")

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: Union[torch.Tensor, float],
        text_negatives: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``text_negatives`` (optional, ``(n, P)`` normalised): hard-negative captions, one per
        image (NegCLIP). They are extra columns of the image-to-text softmax only (gathered across
        ranks like the other features); the text-to-image direction is unchanged."""
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                "ContrastiveLoss expects image and text features of the same shape (n, P), got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        img, txt, neg = image_features, text_features, text_negatives
        if neg is not None and neg.shape != txt.shape:
            raise ValueError(f"text_negatives must have the shape of the text features {tuple(txt.shape)}, "
                             f"got {tuple(neg.shape)}")
        if img.dtype in _LOW_PRECISION:
            img = img.float()
        if txt.dtype in _LOW_PRECISION:
            txt = txt.float()
        if neg is not None and neg.dtype in _LOW_PRECISION:
            neg = neg.float()
        scale = torch.as_tensor(logit_scale, device=img.device)
        if not scale.is_floating_point() or scale.dtype in _LOW_PRECISION:
            scale = scale.float()

        n = img.shape[0]
        world, rank = self._world()
        if world > 1:
            sizes = exchange_sizes(n, img.device, self.group)
            all_img = gather_with_grad(img, sizes, self.group)
            all_txt = gather_with_grad(txt, sizes, self.group)
            all_neg = gather_with_grad(neg, sizes, self.group) if neg is not None else None
            offset, total = sum(sizes[:rank]), sum(sizes)
        else:
            all_img, all_txt, all_neg, offset, total = img, txt, neg, 0, n
        if total == 0:
            raise ValueError("ContrastiveLoss got an empty global batch")

        columns = all_txt if all_neg is None else torch.cat([all_txt, all_neg])
        logits_per_image = scale * img @ columns.t()
        logits_per_text = scale * txt @ all_img.t()
        labels = torch.arange(n, device=img.device) + offset
        nll = F.cross_entropy(logits_per_image, labels, reduction="sum") + F.cross_entropy(
            logits_per_text, labels, reduction="sum"
        )
        # sum over local rows * W / N: the mean over ranks is the global-batch mean loss,
        # also when ranks hold different numbers of pairs.
        return 0.5 * nll * (world / total)


@torch.no_grad()
def clamp_logit_scale_(param: torch.Tensor, max: float = math.log(100.0), min: float = 0.0) -> torch.Tensor:  # noqa: A002
    """Clamp the log-temperature parameter in place to ``[min, max]`` (CLIP: ``[0, ln 100]``).

    Call after ``optimizer.step()``; it keeps ``exp(param)`` <= 100. Returns ``param``.
    """
    return param.clamp_(min=min, max=max)
