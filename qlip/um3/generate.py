"""Sampling from a UM3 model: text continuation, captioning and text-to-image.

One loop (:func:`generate`) with a KV cache per prompt (``use_cache=False`` recomputes the whole
sequence at every step: the reference the cache is tested against). Each step is restricted to
the rows Eq. 6 trained for that position (:func:`qlip.um3.loss.restrict_logits`):

* text (continuation, captions): the text rows ``[0, text_size)``, until ``<eos>``;
* inside ``<boi> ... <eoi>``: sub-token ``i`` of an image is group ``i % groups``, so only that
  group's ``2 ** (bits / groups)`` rows; exactly ``N * groups`` steps, then ``<eoi>``. In the
  ``token`` layout (:mod:`qlip.um3.vocab`) an image is ``N`` steps, each drawing the token's
  sub-tokens one after another from the position's state (:meth:`UM3.sample_image_tokens`).

Text-to-image uses classifier-free guidance on logits (:func:`qlip.nn.cfg_logits`, LlamaGen's
``uncond + s * (cond - uncond)``) between the caption prompt ``<bos> caption <boi>`` and the
unconditional prompt ``<bos> <boi>`` the training's caption dropout taught; each prompt has its
own cache, so the two may differ in length. Images in and out are QLIP ids ``(B, h, w)``: the
caller tokenizes (``QLIP.tokenize``) and detokenizes (``QLIP.detokenize``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import QLIPError
from ..nn import cfg_logits, sample
from .loss import restrict_logits
from .model import UM3
from .text import TextTokenizer


@dataclass
class Sampling:
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    cfg_scale: float = 1.0          # guidance (draw: against <bos> <boi>; caption: against the text-only
                                    # <bos>); 1 = conditional, no guidance
    seed: Optional[int] = None


class _Stream:
    """A growing batch of sequences and the final hidden state of its last position (cached or
    recomputed); ``logits``: the output layer on it."""

    def __init__(self, model: UM3, prompt: torch.Tensor, max_new: int, use_cache: bool):
        self.model, self.seq, self.use_cache = model, prompt, use_cache
        self.cache = model.make_cache(prompt.shape[0], prompt.shape[1] + max_new) if use_cache else None
        self.h = model.next_hidden(prompt, cache=self.cache)

    @property
    def logits(self) -> torch.Tensor:
        return F.linear(self.h, self.model.output_weight()).float()

    def push(self, tok: torch.Tensor) -> None:
        self.seq = torch.cat([self.seq, tok[:, None]], 1)
        if self.use_cache:
            self.h = self.model.next_hidden(tok[:, None], cache=self.cache)
        else:
            self.h = self.model.next_hidden(self.seq)


@torch.no_grad()
def _decode(model: UM3, prompt: torch.Tensor, max_new: int, pick: Callable, sampling: Sampling,
            uncond: Optional[torch.Tensor] = None, stop: Optional[int] = None, use_cache: bool = True,
            feed: Callable[[torch.Tensor], torch.Tensor] = lambda tok: tok) -> torch.Tensor:
    """The decoding loop of every mode: ``max_new`` outputs after ``prompt`` ``(B, T)``; step ``i``'s
    output is ``pick(i, cond, free, generator)`` (``cond`` / ``free``: the :class:`_Stream` of the
    prompt and of ``uncond``, ``None`` without it), and ``feed(output)`` is the next entry of both
    streams. With ``stop`` the loop ends once every row has produced it (later outputs are ``stop``)."""
    dev = model.lm.output.weight.device
    g = torch.Generator(device=dev).manual_seed(sampling.seed) if sampling.seed is not None else None
    cond = _Stream(model, prompt.to(dev), max_new, use_cache)
    free = _Stream(model, uncond.to(dev), max_new, use_cache) if uncond is not None else None
    out: List[torch.Tensor] = []
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=dev)
    for i in range(max_new):
        tok = pick(i, cond, free, g)
        if stop is not None:
            tok = torch.where(done, torch.full_like(tok, stop), tok)
            done |= tok == stop
        out.append(tok)
        if (stop is not None and bool(done.all())) or i == max_new - 1:
            break
        nxt = feed(tok)
        cond.push(nxt)
        if free is not None:
            free.push(nxt)
    return torch.stack(out, 1)


def generate(model: UM3, prompt: torch.Tensor, max_new: int, rows: Callable[[int], Tuple[int, int]],
             sampling: Sampling = Sampling(), uncond: Optional[torch.Tensor] = None,
             stop: Optional[int] = None, use_cache: bool = True) -> torch.Tensor:
    """``max_new`` tokens after ``prompt`` ``(B, T)``; step ``i`` samples among rows ``rows(i)``.
    With ``uncond`` (``(B, T')``) the logits are guided with ``sampling.cfg_scale``. With ``stop``
    the loop ends once every row has produced it (later tokens of a row are ``stop``)."""
    def pick(i: int, cond: _Stream, free: Optional[_Stream], g) -> torch.Tensor:
        logits = cond.logits if free is None else cfg_logits(cond.logits, free.logits, sampling.cfg_scale)
        lo, hi = rows(i)
        return sample(restrict_logits(logits, lo, hi), temperature=sampling.temperature, top_k=sampling.top_k,
                      top_p=sampling.top_p, generator=g)

    return _decode(model, prompt, max_new, pick, sampling, uncond, stop, use_cache)


def _text_out(model: UM3, tok: TextTokenizer, new: torch.Tensor) -> List[str]:
    texts = []
    for row in new.tolist():
        row = row[: row.index(model.eos_id)] if model.eos_id in row else row
        texts.append(tok.decode(row))
    return texts


def continue_text(model: UM3, tok: TextTokenizer, prompt: str, max_new: int = 64, sampling: Sampling = Sampling(),
                  n: int = 1, use_cache: bool = True) -> List[str]:
    """``n`` continuations of ``prompt`` (text rows only, until ``<eos>``)."""
    ids = torch.tensor([[model.bos_id] + tok.encode(prompt)] * n)
    new = generate(model, ids, max_new, lambda i: (0, model.vocab.text_size), sampling, stop=model.eos_id,
                   use_cache=use_cache)
    return _text_out(model, tok, new)


def caption(model: UM3, tok: TextTokenizer, image_ids: torch.Tensor, max_new: int = 48,
            sampling: Sampling = Sampling(temperature=0.0), use_cache: bool = True) -> List[str]:
    """Captions of images given as QLIP ids ``(B, h, w)`` or ``(B, N)``: ``<bos> <boi> image <eoi>`` -> text.
    With ``sampling.cfg_scale != 1`` the words are guided against the text-only model (``<bos>`` and
    the caption so far, no image): what the image adds to the language prior is amplified (ours)."""
    v = model.vocab
    rows = v.image_seq(image_ids.cpu())
    B = rows.shape[0]
    prompt = torch.cat([torch.tensor([[model.bos_id, v.boi]] * B), rows, torch.full((B, 1), v.eoi)], 1)
    uncond = torch.tensor([[model.bos_id]] * B) if sampling.cfg_scale != 1.0 else None
    new = generate(model, prompt, max_new, lambda i: (0, v.text_size), sampling, uncond=uncond, stop=model.eos_id,
                   use_cache=use_cache)
    return _text_out(model, tok, new)


def draw(model: UM3, tok: TextTokenizer, captions: List[str], grid: Tuple[int, int], sampling: Sampling = Sampling(),
         use_cache: bool = True) -> torch.Tensor:
    """QLIP ids ``(B, h, w)`` for the captions: ``<bos> caption <boi>`` -> ``h * w`` image tokens
    (``h * w * groups`` sub-token steps, or ``h * w`` steps of the sub-token chain in the ``token``
    layout), guided against ``<bos> <boi>`` when ``sampling.cfg_scale != 1``."""
    v = model.vocab
    vis = v.visual
    prompts = [[model.bos_id] + tok.encode(c) + [v.boi] for c in captions]
    lengths = sorted({len(p) for p in prompts})
    if len(lengths) != 1:  # one batch needs one length: draw each length's captions together
        out = torch.empty(len(captions), *grid, dtype=torch.int64)
        for n in lengths:
            which = [i for i, p in enumerate(prompts) if len(p) == n]
            out[which] = draw(model, tok, [captions[i] for i in which], grid, sampling, use_cache)
        return out
    prompt = torch.tensor(prompts)
    uncond = torch.tensor([[model.bos_id, v.boi]] * len(captions)) if sampling.cfg_scale != 1.0 else None
    if v.layout == "token":
        return _draw_tokens(model, prompt, uncond, grid[0] * grid[1], sampling, use_cache).view(len(captions), *grid)
    n = grid[0] * grid[1] * v.groups

    def rows(i: int) -> Tuple[int, int]:
        lo = vis.group_start(i % v.groups)
        return lo, lo + vis.group_size

    sub = generate(model, prompt, n, rows, sampling, uncond=uncond, use_cache=use_cache)
    if sub.shape[1] != n:
        raise QLIPError(f"draw: expected {n} sub-tokens, got {sub.shape[1]}")
    return v.visual.decode(sub.cpu()).view(len(captions), *grid)


def _draw_tokens(model: UM3, prompt: torch.Tensor, uncond: Optional[torch.Tensor], n: int, sampling: Sampling,
                 use_cache: bool) -> torch.Tensor:
    """``token`` layout: ``n`` QLIP ids ``(B, n)``, one position each (:meth:`UM3.sample_image_tokens`)."""
    def pick(i: int, cond: _Stream, free: Optional[_Stream], g) -> torch.Tensor:
        return model.sample_image_tokens(cond.h, None if free is None else free.h, sampling.cfg_scale,
                                         sampling.temperature, sampling.top_k, sampling.top_p, g)

    start = model.vocab.visual_start
    return _decode(model, prompt, n, pick, sampling, uncond, use_cache=use_cache, feed=lambda ids: ids + start).cpu()
