"""Gradient caching: a contrastive batch larger than what fits in memory at once.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021).
The contrastive loss couples every pair of the batch only through the embeddings, so
:func:`grad_cache_step` splits one optimisation step into three phases:

1. **Embed** the whole batch chunk by chunk under ``torch.no_grad`` (no activations kept).
2. **Loss on cached embeddings**: the contrastive loss on the detached full-batch embeddings
   (leaf tensors with ``requires_grad``); its backward gives ``dL/d(embedding)`` for every
   sample, and the gradient of the logit scale (its graph is kept, so it goes straight into
   ``model.logit_scale.grad``).
3. **Re-forward** every chunk with gradients and backpropagate the surrogate
   ``sum(embedding * cached_grad) + extra_loss * n_chunk / N``; parameter gradients accumulate
   chunk by chunk and end up equal to those of the plain full-batch ``loss.backward()``.

Extra per-sample losses (the QLIP task's reconstruction and quantiser losses) are computed
in the same re-forward: an encoder function may return ``(embedding, extra_loss)`` where
``extra_loss`` is the **mean over the chunk**; it is weighted by ``n_chunk / N`` so that the
accumulated gradient equals that of the full-batch mean. This is exact for per-sample means
(MSE, L1, LPIPS, the BSQ commitment and per-sample entropy). Terms that are statistics of the
whole batch (the BSQ *codebook* entropy, BatchNorm) are evaluated per chunk by this function:
their gradient is that of the average of the per-chunk values, not of the full-batch value. The
QLIP task makes the codebook entropy exact on top of it: its phase-1 encoder function sums the
chunks' code distributions and its re-forwards run inside
``BinarySphericalQuantizer.codebook_reference`` (``qlip/train/tasks/qlip.py::QLIPTask._contrastive_step``).

Hard negatives: ``text_negatives`` (token ids, one hard-negative caption per image) are a third
set of embeddings of the text tower, cached, given their gradient by the full-batch loss
(``loss_fn(..., text_negatives=...)``: extra image-to-text columns of the contrastive loss) and
re-forwarded chunk by chunk like the texts.

Randomness: phase 3 must see exactly the same random numbers as phase 1 (dropout, drop-path,
random masking), otherwise the cached gradients belong to different embeddings. With
``replay_rng=True`` (default) the CPU RNG state and the RNG state of the input's accelerator
are saved before each chunk in phase 1 and restored inside ``torch.random.fork_rng`` for the
re-forward, so the global RNG stream after the step is the one phase 1 left behind. Models
without randomness do not need it. Other sources of non-determinism (non-deterministic
kernels, BatchNorm running statistics updated twice) are not replayed.

Distributed: pass a :class:`~qlip.losses.ContrastiveLoss` (it gathers with gradients during
phase 2). Do not wrap the towers in DDP for a gradient-cached step (DDP expects one backward
per forward); average the gradients afterwards with :func:`qlip.nn.collectives.all_reduce_gradients_`. All ranks
must call :func:`grad_cache_step` (phase 2 has collectives); they may use different numbers of
chunks. Extra losses are per-rank means, so keep per-rank batch sizes equal (``drop_last``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["GradCacheOutput", "grad_cache_step"]

EncoderOutput = Union[torch.Tensor, Tuple[torch.Tensor, Optional[torch.Tensor]]]
EncoderFn = Callable[[torch.Tensor], EncoderOutput]


@dataclass
class GradCacheOutput:
    """What one :func:`grad_cache_step` computed (all tensors detached).

    ``loss`` = ``align_weight * contrastive_loss + image_extra_loss + text_extra_loss`` (the
    extras are ``None`` when the encoder function returned none).
    """

    loss: torch.Tensor
    contrastive_loss: torch.Tensor
    image_extra_loss: Optional[torch.Tensor]
    text_extra_loss: Optional[torch.Tensor]
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    negative_embeds: Optional[torch.Tensor] = None  # hard-negative captions (``text_negatives``)


class _RngState:
    """CPU RNG state plus the state of one accelerator's RNG (when the input lives on one)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accel = None
        if device.type != "cpu":
            module = getattr(torch, device.type, None)
            if module is not None and hasattr(module, "get_rng_state"):
                index = device.index if device.index is not None else module.current_device()
                self.device = torch.device(device.type, index)
                self.accel = module.get_rng_state(index)

    def replay(self):
        """Context manager: restore this state inside ``fork_rng`` (the global stream is untouched)."""
        return _Replay(self)


class _Replay:
    def __init__(self, state: _RngState):
        self.state = state
        self._fork = None

    def __enter__(self):
        st = self.state
        if st.accel is not None:
            self._fork = torch.random.fork_rng(devices=[st.device.index], device_type=st.device.type)
        else:
            self._fork = torch.random.fork_rng(devices=[])
        self._fork.__enter__()
        torch.set_rng_state(st.cpu)
        if st.accel is not None:
            getattr(torch, st.device.type).set_rng_state(st.accel, st.device.index)
        return self

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


class _NoReplay:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _unpack(out: EncoderOutput, what: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if torch.is_tensor(out):
        return out, None
    if isinstance(out, (tuple, list)) and len(out) == 2 and torch.is_tensor(out[0]):
        extra = out[1]
        if extra is not None and (not torch.is_tensor(extra) or extra.numel() != 1):
            raise TypeError(f"{what} must return (embedding, scalar extra loss or None); got a {type(extra).__name__}")
        return out[0], (extra.reshape(()) if extra is not None else None)
    raise TypeError(f"{what} must return an embedding tensor or a tuple (embedding, extra_loss)")


def _check_embedding(emb: torch.Tensor, n: int, what: str) -> None:
    if emb.dim() != 2 or emb.shape[0] != n:
        raise ValueError(f"{what} returned embeddings of shape {tuple(emb.shape)} for {n} inputs; expected ({n}, P)")


def _embed_no_grad(fn: EncoderFn, chunks: Sequence[torch.Tensor], replay_rng: bool, what: str):
    embeds: List[torch.Tensor] = []
    states: List[Optional[_RngState]] = []
    with torch.no_grad():
        for chunk in chunks:
            states.append(_RngState(chunk.device) if replay_rng else None)
            emb, _ = _unpack(fn(chunk), what)
            _check_embedding(emb, chunk.shape[0], what)
            embeds.append(emb)
    return torch.cat(embeds, dim=0), states


def _reforward_backward(
    fn: EncoderFn,
    chunks: Sequence[torch.Tensor],
    states: Sequence[Optional[_RngState]],
    grads: torch.Tensor,
    total: int,
    what: str,
) -> Optional[torch.Tensor]:
    extra_sum: Optional[torch.Tensor] = None
    start = 0
    for chunk, state in zip(chunks, states):
        n = chunk.shape[0]
        grad = grads[start : start + n]
        start += n
        with state.replay() if state is not None else _NoReplay():
            emb, extra = _unpack(fn(chunk), what)
        if emb.shape != grad.shape:
            raise ValueError(f"{what} returned shape {tuple(emb.shape)} on re-forward, {tuple(grad.shape)} before")
        # d/d(emb) of sum(emb * grad) is the cached gradient of the contrastive loss.
        surrogate = (emb * grad.to(emb.dtype)).sum()
        if extra is not None:
            weighted = extra * (n / total)
            surrogate = surrogate + weighted
            extra_sum = weighted.detach() if extra_sum is None else extra_sum + weighted.detach()
        if surrogate.requires_grad:
            surrogate.backward()
    return extra_sum


def _embedding_only(fn: EncoderFn, what: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` returning only its embedding (an extra loss it returns is dropped)."""
    return lambda chunk: _unpack(fn(chunk), what)[0]


def _objective(align_weight: float, contrastive: torch.Tensor,
               extras: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """``align_weight * contrastive + sum of the extras that are not None``."""
    total = align_weight * contrastive
    for extra in extras:
        if extra is not None:
            total = total + extra
    return total


def grad_cache_step(
    image_encoder_fn: EncoderFn,
    text_encoder_fn: EncoderFn,
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    chunk_size: int,
    *,
    logit_scale: Optional[Union[torch.Tensor, float]] = None,
    align_weight: float = 1.0,
    replay_rng: bool = True,
    text_negatives: Optional[torch.Tensor] = None,
) -> GradCacheOutput:
    """Accumulate into ``.grad`` the gradients of ``align_weight * loss_fn(...) + extras`` on a big batch.

    Args:
        image_encoder_fn: ``chunk -> embedding`` or ``chunk -> (embedding, extra_loss)``, with
            ``embedding`` of shape ``(n, P)`` (normalised, as the loss expects) and
            ``extra_loss`` a scalar **mean over the chunk** (already weighted, e.g.
            ``alpha_r * mse + alpha_q * bsq``). Called twice per chunk: once under
            ``torch.no_grad`` (only the embedding is used; the function may skip extra work
            when ``torch.is_grad_enabled()`` is False) and once with gradients.
        text_encoder_fn: the same for the text tower (token ids chunk -> embedding).
        images, texts: the full local batch (first dims equal); split with ``Tensor.split``.
        loss_fn: ``loss_fn(image_embeds, text_embeds, logit_scale)`` (or without
            ``logit_scale`` when it is None), e.g. a :class:`~qlip.losses.ContrastiveLoss`.
        chunk_size: samples per forward. ``chunk_size >= batch`` runs the plain single-pass
            forward/backward (same result, no re-forward).
        logit_scale: passed to ``loss_fn``; give ``model.logit_scale.exp()`` freshly built for
            this step so its gradient reaches the parameter.
        align_weight: weight of the contrastive term (the paper's ``alpha_a``).
        replay_rng: replay the RNG state per chunk in the re-forward (see module docstring).
        text_negatives: optional hard-negative captions, one per image (first dim that of
            ``images``). They are embedded by ``text_encoder_fn`` like the texts (cached without
            graph, then re-forwarded chunk by chunk with their embedding gradients; an extra loss
            the function returns for them is dropped) and passed to the loss as
            ``loss_fn(..., text_negatives=embeddings)``, e.g. the extra image-to-text columns of
            :class:`~qlip.losses.ContrastiveLoss`.

    Returns:
        :class:`GradCacheOutput` with detached values. Gradients are *accumulated* (zero them
        before, step the optimiser after, as usual).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = images.shape[0]
    for name, batch in (("texts", texts), ("text_negatives", text_negatives)):
        if batch is not None and batch.shape[0] != total:
            raise ValueError(f"images and {name} must have the same batch size, got {total} and {batch.shape[0]}")
    # (name, encoder function, inputs) of every embedding the loss sees, in the loss's order
    towers = [("image_encoder_fn", image_encoder_fn, images), ("text_encoder_fn", text_encoder_fn, texts)]
    if text_negatives is not None:
        what = "text_encoder_fn (hard negatives)"
        towers.append((what, _embedding_only(text_encoder_fn, what), text_negatives))

    def call_loss(embeds: Sequence[torch.Tensor]) -> torch.Tensor:
        args = tuple(embeds[:2]) if logit_scale is None else (embeds[0], embeds[1], logit_scale)
        kwargs = {"text_negatives": embeds[2]} if len(embeds) > 2 else {}
        return loss_fn(*args, **kwargs)

    if chunk_size >= total:  # everything fits: plain forward/backward
        outs = [_unpack(fn(x), what) for what, fn, x in towers]
        for (what, _, _), (emb, _) in zip(towers, outs):
            _check_embedding(emb, total, what)
        embeds = [emb for emb, _ in outs]
        extras = [extra for _, extra in outs]
        closs = call_loss(embeds)
        full = _objective(align_weight, closs, extras)
        full.backward()
        extras = [None if extra is None else extra.detach() for extra in extras]
        loss = full.detach()
    else:
        chunks = [x.split(chunk_size) for _, _, x in towers]
        # 1) embeddings of the whole batch, no activations kept
        cached = [_embed_no_grad(fn, c, replay_rng, what) for (what, fn, _), c in zip(towers, chunks)]
        embeds = [emb for emb, _ in cached]
        # 2) loss on the cached embeddings -> d loss / d embedding (and d loss / d logit_scale)
        leaves = [emb.detach().requires_grad_(True) for emb in embeds]
        closs = call_loss(leaves)
        (align_weight * closs).backward()
        # 3) re-forward chunk by chunk with gradients, backward the cached embedding gradient
        extras = [
            _reforward_backward(fn, c, states, leaf.grad if leaf.grad is not None else torch.zeros_like(leaf),
                                total, what)
            for (what, fn, _), c, (_, states), leaf in zip(towers, chunks, cached, leaves)
        ]
        loss = _objective(align_weight, closs.detach(), extras)

    return GradCacheOutput(
        loss=loss,
        contrastive_loss=closs.detach(),
        image_extra_loss=extras[0],
        text_extra_loss=extras[1],
        image_embeds=embeds[0].detach(),
        text_embeds=embeds[1].detach(),
        negative_embeds=embeds[2].detach() if len(embeds) > 2 else None,
    )
