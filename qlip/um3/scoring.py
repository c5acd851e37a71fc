"""How much a UM3's drawing uses its caption: log-likelihoods of text-to-image rows, no sampling.

A drawing row ``<bos> caption <boi> image <eoi>`` (the training layout: :func:`qlip.um3.mixing.multimodal_row`) is
scored with its caption, with no caption (the unconditional row of classifier-free guidance) and
with every colour word replaced by another colour. The differences, in nats per image, say what
the caption and its colour word are worth to the model's image distribution
(``caption_gain``, ``colour_gain``), a figure without the sampling noise of judged drawings
(docs/um3.md, "Issue 12, third round"). ``benchmarks/um3_colour_gain.py`` prints them for a model
and token shards; ``qlip demo um3`` reports them on the held-out test images.
"""
from __future__ import annotations

import random
from typing import Dict, List

import torch

from .loss import IGNORE
from .mixing import T2I, multimodal_row
from .model import UM3
from .text import TextTokenizer


def swap_colours(caption: str, rng: random.Random) -> str:
    """The caption with each colour word (``qlip.data.shapes.COLOR_NAMES``) replaced by another colour."""
    from ..data.shapes import COLOR_NAMES
    return " ".join(rng.choice([c for c in COLOR_NAMES if c != w]) if w in COLOR_NAMES else w
                    for w in caption.split())


@torch.no_grad()
def drawing_nll(model: UM3, tok: TextTokenizer, captions: List[str], ids: torch.Tensor) -> torch.Tensor:
    """Per-image NLL (nats, float64) of the QLIP ids ``(N, h, w)`` after ``<bos> caption <boi>``
    (an empty caption: ``<bos> <boi>``), summed over the sub-tokens and ``<eoi>``; one row at a time,
    so captions of different lengths need no padding."""
    v = model.vocab
    out = []
    for cap, x in zip(captions, ids):
        row, first = multimodal_row(T2I, v, model.bos_id, model.eos_id, tok.encode(cap) if cap else [],
                                    v.image_seq(x[None].long())[0].tolist())
        seq = torch.tensor([row])
        labels = seq[:, 1:].clone()
        labels[:, : first - 1] = IGNORE  # input t predicts seq[t + 1]: targets from seq[first] on
        out.append(float(model.nll(seq[:, :-1], labels, "split").sum()))
    return torch.tensor(out, dtype=torch.float64)


def caption_gains(model: UM3, tok: TextTokenizer, captions: List[str], ids: torch.Tensor,
                  seed: int = 0) -> Dict[str, float]:
    """Mean NLLs (with the caption, without it, colour words swapped, seeded) and the two gains."""
    rng = random.Random(seed)
    cond = drawing_nll(model, tok, captions, ids)
    uncond = drawing_nll(model, tok, [""] * len(captions), ids)
    swapped = drawing_nll(model, tok, [swap_colours(c, rng) for c in captions], ids)
    return {"nll_caption": float(cond.mean()), "nll_no_caption": float(uncond.mean()),
            "nll_colour_swapped": float(swapped.mean()), "caption_gain": float((uncond - cond).mean()),
            "colour_gain": float((swapped - cond).mean())}
