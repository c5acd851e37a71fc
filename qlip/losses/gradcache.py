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

Extra per-sample losses (the QLIP trainer's reconstruction and quantiser losses) are computed
in the same re-forward: an encoder function may return ``(embedding, extra_loss)`` where
``extra_loss`` is the **mean over the chunk**; it is weighted by ``n_chunk / N`` so that the
accumulated gradient equals that of the full-batch mean. This is exact for per-sample means
(MSE, L1, LPIPS, the BSQ commitment and per-sample entropy). Terms that are statistics of the
whole batch (the BSQ *codebook* entropy, BatchNorm) are evaluated per chunk instead: their
gradient is that of the average of the per-chunk values, not of the full-batch value.

Randomness: phase 3 must see exactly the same random numbers as phase 1 (dropout, drop-path,
random masking), otherwise the cached gradients belong to different embeddings. With
``replay_rng=True`` (default) the CPU RNG state and the RNG state of the input's accelerator
are saved before each chunk in phase 1 and restored inside ``torch.random.fork_rng`` for the
re-forward, so the global RNG stream after the step is the one phase 1 left behind. Models
without randomness do not need it. Other sources of non-determinism (non-deterministic
kernels, BatchNorm running statistics updated twice) are not replayed.

Distributed: pass a :class:`~qlip.losses.ContrastiveLoss` (it gathers with gradients during
phase 2). Do not wrap the towers in DDP for a gradient-cached step (DDP expects one backward
per forward); average the gradients afterwards with :func:`all_reduce_gradients_`. All ranks
must call :func:`grad_cache_step` (phase 2 has collectives); they may use different numbers of
chunks. Extra losses are per-rank means, so keep per-rank batch sizes equal (``drop_last``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

__all__ = ["GradCacheOutput", "grad_cache_step", "all_reduce_gradients_"]

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

    Returns:
        :class:`GradCacheOutput` with detached values. Gradients are *accumulated* (zero them
        before, step the optimiser after, as usual).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = images.shape[0]
    if texts.shape[0] != total:
        raise ValueError(f"images and texts must have the same batch size, got {total} and {texts.shape[0]}")

    def call_loss(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return loss_fn(img, txt) if logit_scale is None else loss_fn(img, txt, logit_scale)

    if chunk_size >= total:  # everything fits: plain forward/backward
        img_emb, img_extra = _unpack(image_encoder_fn(images), "image_encoder_fn")
        txt_emb, txt_extra = _unpack(text_encoder_fn(texts), "text_encoder_fn")
        _check_embedding(img_emb, total, "image_encoder_fn")
        _check_embedding(txt_emb, total, "text_encoder_fn")
        closs = call_loss(img_emb, txt_emb)
        full = align_weight * closs
        for extra in (img_extra, txt_extra):
            if extra is not None:
                full = full + extra
        full.backward()
        return GradCacheOutput(
            loss=full.detach(),
            contrastive_loss=closs.detach(),
            image_extra_loss=None if img_extra is None else img_extra.detach(),
            text_extra_loss=None if txt_extra is None else txt_extra.detach(),
            image_embeds=img_emb.detach(),
            text_embeds=txt_emb.detach(),
        )

    image_chunks = images.split(chunk_size)
    text_chunks = texts.split(chunk_size)

    # 1) embeddings of the whole batch, no activations kept
    img_all, img_states = _embed_no_grad(image_encoder_fn, image_chunks, replay_rng, "image_encoder_fn")
    txt_all, txt_states = _embed_no_grad(text_encoder_fn, text_chunks, replay_rng, "text_encoder_fn")

    # 2) loss on the cached embeddings -> d loss / d embedding (and d loss / d logit_scale)
    img_leaf = img_all.detach().requires_grad_(True)
    txt_leaf = txt_all.detach().requires_grad_(True)
    closs = call_loss(img_leaf, txt_leaf)
    (align_weight * closs).backward()
    img_grad = img_leaf.grad if img_leaf.grad is not None else torch.zeros_like(img_leaf)
    txt_grad = txt_leaf.grad if txt_leaf.grad is not None else torch.zeros_like(txt_leaf)

    # 3) re-forward chunk by chunk with gradients, backward the cached embedding gradient
    img_extra = _reforward_backward(image_encoder_fn, image_chunks, img_states, img_grad, total, "image_encoder_fn")
    txt_extra = _reforward_backward(text_encoder_fn, text_chunks, txt_states, txt_grad, total, "text_encoder_fn")

    loss = align_weight * closs.detach()
    for extra in (img_extra, txt_extra):
        if extra is not None:
            loss = loss + extra
    return GradCacheOutput(
        loss=loss,
        contrastive_loss=closs.detach(),
        image_extra_loss=img_extra,
        text_extra_loss=txt_extra,
        image_embeds=img_all,
        text_embeds=txt_all,
    )


@torch.no_grad()
def all_reduce_gradients_(parameters: Iterable[torch.Tensor], group=None, average: bool = True) -> None:
    """All-reduce (mean by default) the ``.grad`` of ``parameters`` across ranks, in place.

    The manual replacement for DDP's gradient averaging after :func:`grad_cache_step`.
    Parameters whose ``.grad`` is None are skipped: every rank must have gradients for the same
    parameters (in the same order). No-op when torch.distributed is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size(group=group)
    if world == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    # one flat buffer per (device, dtype): one collective each instead of one per parameter
    buckets: dict = {}
    for g in grads:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for bucket in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat.div_(world)
        offset = 0
        for g in bucket:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
