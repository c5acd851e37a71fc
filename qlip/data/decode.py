"""Image files -> batches of model inputs, decoded in parallel worker processes.

``qlip tokenize`` / ``qlip reconstruct`` on a folder spend time in two places: decoding and
resizing the image files (PIL, one core) and the model. :func:`image_batches` moves the first into
``workers`` DataLoader processes that prepare the next batches while the model runs on the current
one, so the model is kept busy (benchmarks/throughput.py measures end to end against the model
alone). The preprocessing is exactly ``QLIP.preprocess`` (same resize, crop and normalisation, per
image), so the batches, and hence the ids, are identical for any number of workers.

A file that cannot be read is reported as the one-line :class:`DataError` of ``open_image``, also
when it was decoded in a worker (DataLoader would otherwise re-raise it with a worker traceback).
"""
from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from ..model.config import PreprocessConfig
from ..model.preprocess import normalize, open_image, pil_to_tensor, resize_center_crop


class ImageFiles(Dataset):
    """Image paths -> normalised (3, H, W) float tensors, the per-image part of ``QLIP.preprocess``.

    ``__getitem__`` returns ``(tensor, None)`` or, for an unreadable file, ``(None, message)``, so
    that the error reaches the main process as one line."""

    def __init__(self, paths: Sequence[str], preprocess: PreprocessConfig):
        self.paths, self.pp = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tuple[Optional[torch.Tensor], Optional[str]]:
        pp = self.pp
        try:
            im = resize_center_crop(open_image(self.paths[i]), pp.resize, pp.crop, pp.interpolation)
        except DataError as e:
            return None, str(e)
        return normalize(pil_to_tensor(im)[None], pp.mean, pp.std)[0], None


def _collate(items: List[Tuple[Optional[torch.Tensor], Optional[str]]]):
    errors = [msg for _, msg in items if msg is not None]
    if errors:
        return None, errors
    return torch.stack([x for x, _ in items]), []


def image_batches(paths: Sequence[str], preprocess: PreprocessConfig, batch_size: int, workers: int = 0,
                  pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """Yield (B, 3, H, W) normalised batches of ``paths`` in order; ``workers`` decoding processes
    (0: decode in this process). Raises the first unreadable file's :class:`DataError`."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    n_batches = -(-len(paths) // batch_size)
    workers = min(workers, max(n_batches - 1, 0))  # one batch: nothing to overlap with
    loader = DataLoader(ImageFiles(paths, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
                        prefetch_factor=2 if workers else None)
    for x, errors in loader:
        if errors:
            raise DataError(errors[0])
        yield x
