"""Mixed batches of text-only, image-to-text and text-to-image samples (paper Sec. 4.1).

Every row is ``seq_len + 1`` token rows (the model reads the first ``seq_len`` and predicts the
last ``seq_len``); ``labels[t]`` is the target of input position ``t`` or ``IGNORE``:

    text-only       a window of the tokenized text corpus                 loss on every token
    image-to-text   <bos> <boi> v_1 .. v_2N <eoi> caption <eos> pad..     loss on caption + <eos>
    text-to-image   <bos> caption <boi> v_1 .. v_2N <eoi> pad..           loss on v_1 .. v_2N + <eoi>

(``v``: visual sub-tokens, ``groups`` per QLIP token, or one entry per QLIP token in the ``token``
layout, :mod:`qlip.um3.vocab`; pads are ``<eos>``, never a target). For
classifier-free guidance a text-to-image caption is dropped with probability ``cfg_dropout``
(``<bos> <boi> v .. <eoi>``: the unconditional prompt used at sampling). That is also the start of
every image-to-text row: with ``i2t_image_loss`` (ours, off by default) an image-to-text row
scores ``v_1 .. <eoi>`` too, an unconditional drawing at no extra compute; ``split`` marks where
its caption segment starts (for a per-segment mean, ``n_segments`` counts the global batch's).

**Mixing.** Batch ``i`` belongs to optimizer step ``s = i // grad_accum``; its global batch of
``B = batch_size * world_size`` rows holds ``round(r(s) * B)`` text-only rows
(:mod:`qlip.um3.schedule`, Eq. 7 or constant), the others image-to-text with probability
``i2t_share``, else text-to-image. Every random choice of batch ``i`` (which rows, the text
offsets, the images, the caption drops) comes from a generator seeded with ``(seed, i)``, and rank
``r`` keeps rows ``[r * batch_size, (r + 1) * batch_size)`` of that global batch. So a batch is a
pure function of the seed and its index: resuming needs only the index, and N ranks together see
exactly the one-process batch. Each batch also carries the **global** number of target tokens
(``n_targets``, per kind in ``n_kind``) so that the loss is the token mean over the global batch
on any number of ranks.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.loader_state import IndexedLoader
from ..errors import ConfigError, DataError
from .loss import IGNORE
from .schedule import text_rows
from .text import TextTokenizer
from .vocab import UM3Vocab

TEXT, I2T, T2I = 0, 1, 2
KINDS = ("text", "i2t", "t2i")


def tokenize_corpus(paths: Union[str, Sequence[str]], tokenizer: TextTokenizer) -> np.ndarray:
    """The text files (paths or globs), each tokenized and followed by ``<eos>``, as one int64 array."""
    items = [paths] if isinstance(paths, str) else list(paths)
    files: List[str] = []
    for item in items:
        found = sorted(glob.glob(os.path.expanduser(item))) if glob.has_magic(item) else [item]
        if not found:
            raise DataError(f"{item}: pattern matches no text files")
        files += found
    ids: List[int] = []
    for f in files:
        try:
            with open(f, encoding="utf-8") as fh:
                ids += tokenizer.encode(fh.read()) + [tokenizer.eos_id]
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: cannot read the text corpus ({e.__class__.__name__}: {e})") from None
    return np.asarray(ids, dtype=np.int64)


def multimodal_row(kind: int, vocab: UM3Vocab, bos_id: int, eos_id: int, caption: List[int],
                   image: List[int]) -> Tuple[List[int], int]:
    """(token ids, index in them of the first target) of an image-to-text row
    ``<bos> <boi> image <eoi> caption <eos>`` (targets: the caption and ``<eos>``) or a text-to-image
    row ``<bos> caption <boi> image <eoi>`` (targets: the sub-tokens and ``<eoi>``; an empty caption is
    the unconditional row of guidance). ``image``: the visual rows of one image."""
    img = [vocab.boi] + list(image) + [vocab.eoi]
    if kind == I2T:
        return [bos_id] + img + list(caption) + [eos_id], 1 + len(img)
    if kind == T2I:
        return [bos_id] + list(caption) + img, 2 + len(caption)
    raise ValueError(f"multimodal_row: kind {kind} is neither I2T ({I2T}) nor T2I ({T2I})")


@dataclass
class MixConfig:
    batch_size: int                 # rows per rank and micro-batch
    seq_len: int                    # model input length
    r0: float = 0.5                 # Eq. 7: text-only fraction at step 0 ...
    rT: float = 0.2                 # ... and from step T on
    T: int = 1000
    schedule: str = "calm_down"     # calm_down | constant (r_T throughout)
    i2t_share: float = 0.5          # multimodal rows that are image-to-text (the rest text-to-image)
    cfg_dropout: float = 0.1        # text-to-image rows whose caption is dropped (unconditional)
    grad_accum: int = 1
    i2t_from: int = 0               # ours: before this step every multimodal row is text-to-image
    i2t_image_loss: bool = False    # ours: an image-to-text row also scores its image (= an unconditional drawing)


class MixedLoader(IndexedLoader):
    """Infinite, exactly resumable stream of mixed batches:
    ``{"tokens": (b, seq_len+1), "labels": (b, seq_len), "kind": (b,), "split": (b,), "n_targets": (),
    "n_kind": (3,), "n_segments": (), "text_fraction": ()}``."""

    what = "UM3 mixed loader"

    def __init__(self, text_ids: np.ndarray, images: Any, vocab: UM3Vocab, tokenizer: TextTokenizer,
                 mix: MixConfig, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.text_ids, self.images, self.vocab, self.tok, self.mix = text_ids, images, vocab, tokenizer, mix
        self.seed, self.rank, self.world_size = seed, rank, world_size
        L = mix.seq_len + 1
        if len(text_ids) < L + 1:
            raise DataError(f"the text corpus has {len(text_ids)} tokens; windows of seq_len + 1 = {L} need more")
        if len(images) == 0:
            raise DataError("no image-text samples (token shards) to mix in")
        if int(images.bits) != vocab.bits:
            raise ConfigError(f"the token shards hold {images.bits}-bit ids, the model's vocabulary {vocab.bits} bits")
        self.n_visual = int(np.asarray(images.ids[0]).size) * vocab.per_token
        self.max_caption = L - self.n_visual - 4
        if self.max_caption < 1:
            raise ConfigError(f"data.seq_len={mix.seq_len} leaves no room for a caption next to an image of "
                              f"{self.n_visual} positions (+ <bos> <boi> <eoi> <eos>): use at least "
                              f"{self.n_visual + 4 + 8}")
        self._captions: Dict[int, List[int]] = {}
        super().__init__()

    # ---- rows ----------------------------------------------------------------------------------
    def caption_ids(self, i: int) -> List[int]:
        if i not in self._captions:
            self._captions[i] = self.tok.encode(str(self.images.captions[i]))[: self.max_caption]
        return self._captions[i]

    def image_seq(self, i: int) -> List[int]:
        ids = torch.as_tensor(np.asarray(self.images.ids[i]).astype(np.int64))[None]
        return self.vocab.image_seq(ids)[0].tolist()

    def _row(self, kind: int, text_start: int, image: int, drop_caption: bool):
        """(ids, target flags, split): label positions ``>= split`` are the row's second segment
        (an image-to-text row's caption; ``L - 1``, i.e. none, for the other rows)."""
        L, v = self.mix.seq_len + 1, self.vocab
        if kind == TEXT:
            seq = self.text_ids[text_start:text_start + L].tolist()
            return seq, [True] * (L - 1), L - 1
        cap = [] if kind == T2I and drop_caption else self.caption_ids(image)
        seq, first = multimodal_row(kind, v, self.tok.bos_id, self.tok.eos_id, cap, self.image_seq(image))
        n = len(seq)
        split = first - 1 if kind == I2T else L - 1
        if kind == I2T and self.mix.i2t_image_loss:
            first = 2  # the sub-tokens after <boi> and <eoi>: the unconditional row <bos> <boi> image <eoi>
        target = [first <= t + 1 < n for t in range(L - 1)]  # input t predicts seq[t + 1]
        return seq + [self.tok.eos_id] * (L - n), target, split

    def global_batch(self, index: int) -> Dict[str, torch.Tensor]:
        """All ``batch_size * world_size`` rows of batch ``index`` (a pure function of seed and index)."""
        m = self.mix
        B, L = m.batch_size * self.world_size, m.seq_len + 1
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        order = torch.randperm(B, generator=g)
        mm_kind = torch.where(torch.rand(B, generator=g) < m.i2t_share, I2T, T2I)
        starts = torch.randint(0, len(self.text_ids) - L + 1, (B,), generator=g)
        images = torch.randint(0, len(self.images), (B,), generator=g)
        drops = torch.rand(B, generator=g) < m.cfg_dropout
        step = index // m.grad_accum
        if step < m.i2t_from:  # drawing first: the slow task starts alone (the same random draws either way)
            mm_kind = torch.full_like(mm_kind, T2I)
        n_text = text_rows(step, B, m.r0, m.rT, m.T, m.schedule)
        kind = mm_kind.clone()
        kind[order[:n_text]] = TEXT
        tokens, labels, splits = [], [], []
        for j in range(B):
            seq, target, split = self._row(int(kind[j]), int(starts[j]), int(images[j]), bool(drops[j]))
            seq_t = torch.tensor(seq, dtype=torch.int64)
            lab = seq_t[1:].clone()
            lab[~torch.tensor(target)] = IGNORE
            tokens.append(seq_t)
            labels.append(lab)
            splits.append(split)
        labels_t, split_t = torch.stack(labels), torch.tensor(splits, dtype=torch.int64)
        first, second = segment_masks(labels_t, split_t)
        n_row = (labels_t != IGNORE).sum(1)
        # per-kind target counts (logs): an image-to-text row counts its caption only
        n_kind = torch.stack([(n_row if k != I2T else second.sum(1))[kind == k].sum() for k in range(3)])
        n_segments = (first.any(1).sum() + second.any(1).sum())
        return {"tokens": torch.stack(tokens), "labels": labels_t, "kind": kind, "split": split_t,
                "n_targets": n_row.sum(), "n_kind": n_kind, "n_segments": n_segments,
                "text_fraction": torch.tensor(n_text / B)}

    def batch(self, index: int) -> Dict[str, torch.Tensor]:
        """This rank's rows of batch ``index``; the counts stay global."""
        b = self.global_batch(index)
        lo, hi = self.rank * self.mix.batch_size, (self.rank + 1) * self.mix.batch_size
        return {k: (v[lo:hi] if v.dim() and k in ("tokens", "labels", "kind", "split") else v) for k, v in b.items()}


    # ---- resume ----------------------------------------------------------------------------------
    def _settings(self) -> Dict[str, Any]:
        m = self.mix
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": m.batch_size,
                "seq_len": m.seq_len, "text_tokens": int(len(self.text_ids)), "images": int(len(self.images)),
                "mix": [m.r0, m.rT, m.T, m.schedule, m.i2t_share, m.cfg_dropout, m.grad_accum]
                + ([m.i2t_from] if m.i2t_from else []) + (["i2t_image_loss"] if m.i2t_image_loss else [])}



def segment_masks(labels: torch.Tensor, split: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(b, T)`` masks of each row's two target segments: label positions before
    ``split[row]`` (a text row, a drawing, or the image of an image-to-text row when it is scored)
    and from it on (an image-to-text row's caption)."""
    pos = torch.arange(labels.shape[1], device=labels.device)[None]
    target = labels != IGNORE
    second = target & (pos >= split.to(labels.device)[:, None])
    return target & ~second, second


def text_windows(text_ids: np.ndarray, batch_size: int, seq_len: int, index: int, seed: int = 1) -> torch.Tensor:
    """``(batch_size, seq_len + 1)`` text windows at offsets drawn from ``(seed, index)`` (evaluation)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    starts = torch.randint(0, len(text_ids) - seq_len, (batch_size,), generator=g)
    return torch.from_numpy(np.stack([text_ids[s:s + seq_len + 1] for s in starts.tolist()]).astype(np.int64))
