"""What every evaluation shares: a batch stream cut at ``limit`` images and the model's device.

The data itself (image folders, labelled shards, batches of ``(images, labels)``) is read by
``qlip.data`` (``open_dataset``, ``EvalDataset.batches``); this file holds only the small glue
the evaluations put around it.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch

from qlip.data.evalsets import Batch


def iter_limited(batches: Iterable[Batch], limit: Optional[int]) -> Iterator[Batch]:
    """Pass ``(images, labels)`` batches through, truncating to ``limit`` images in total."""
    seen = 0
    for images, labels in batches:
        if limit is not None:
            if seen >= limit:
                return
            keep = min(len(images), limit - seen)
            images, labels = images[:keep], labels[:keep]
        seen += len(images)
        yield images, labels


def model_device(model) -> torch.device:
    """The device of a model's first parameter (CPU for parameter-less callables)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")
