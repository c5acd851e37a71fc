"""A byte-level text corpus for language-model training, read nanoGPT-style from memory-mapped bytes.

Every token is one byte (vocabulary 256). The corpus is the concatenation of the given text
files; the last ``val_fraction`` of it is held out for validation. A batch is ``batch_size``
windows of ``seq_len + 1`` bytes at random offsets of the training part.

Batches are a pure function of ``(seed, batch index)``: batch ``i`` of the whole job draws its
``global_batch = batch_size * world_size`` offsets from a generator seeded with ``(seed, i)`` and
rank ``r`` keeps rows ``[r * batch_size, (r + 1) * batch_size)``. So the union of the ranks'
batches equals a single process's batch of the global size, and resuming needs only the batch
index (:meth:`ByteCorpusLoader.state_dict`): the continuation is identical to an uninterrupted run.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, List, Sequence, Union

import numpy as np
import torch

from ..errors import DataError
from .loader_state import IndexedLoader

VOCAB_SIZE = 256


def _expand(paths: Union[str, Sequence[str]]) -> List[str]:
    items = [paths] if isinstance(paths, str) else list(paths)
    out: List[str] = []
    for item in items:
        found = sorted(glob.glob(os.path.expanduser(item))) if glob.has_magic(item) else [item]
        if not found:
            raise DataError(f"{item}: pattern matches no text files")
        for f in found:
            if not os.path.isfile(f):
                raise DataError(f"{f}: no such text file")
            out.append(f)
    return out


def read_corpus(paths: Union[str, Sequence[str]]) -> np.ndarray:
    """The bytes of ``paths`` (files or globs) concatenated, as a uint8 array (memory-mapped for
    a single file)."""
    files = _expand(paths)
    if len(files) == 1:
        if os.path.getsize(files[0]) == 0:
            raise DataError(f"{files[0]}: empty text file")
        return np.memmap(files[0], dtype=np.uint8, mode="r")
    parts = [np.fromfile(f, dtype=np.uint8) for f in files]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def encode_text(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as int64 token ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode_bytes(ids) -> str:
    """Token ids (bytes) back to text; invalid UTF-8 sequences become U+FFFD."""
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class ByteCorpusLoader(IndexedLoader):
    """Infinite stream of ``{"tokens": (B, seq_len + 1) int64}`` batches; resumable exactly.

    ``split``: ``"train"`` (the first ``1 - val_fraction`` of the bytes) or ``"val"`` (the rest)."""

    what = "text corpus loader"

    def __init__(self, paths: Union[str, Sequence[str]], batch_size: int, seq_len: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, val_fraction: float = 0.1, split: str = "train"):
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        data = read_corpus(paths)
        cut = int(len(data) * (1 - val_fraction))
        self.data = data[:cut] if split == "train" else data[cut:]
        if len(self.data) < seq_len + 2:
            raise DataError(f"the {split} part of the corpus has {len(self.data)} bytes; windows of "
                            f"seq_len + 1 = {seq_len + 1} need at least {seq_len + 2}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        super().__init__()

    def batch(self, index: int) -> Dict[str, torch.Tensor]:
        """Batch ``index`` of this rank (a pure function of seed, index and rank)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        n = self.batch_size * self.world_size
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (n,), generator=g)
        starts = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        rows = np.stack([np.asarray(self.data[s:s + self.seq_len + 1]) for s in starts.tolist()])
        return {"tokens": torch.from_numpy(rows.astype(np.int64))}


    def _settings(self) -> Dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "num_bytes": len(self.data)}

