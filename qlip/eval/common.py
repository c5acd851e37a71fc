"""What every evaluation shares: a batch stream cut at ``limit`` images and the model's device.

Also the one place that formats accuracies (fractions in JSON, percent when printed).

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


# --------------------------------------------------------------------------- units
# Accuracies are fractions in [0, 1] in every dict and every JSON file qlip writes; they become
# percent only when printed, here. A key names an accuracy when its last dotted part is one of
# these or ends with "_acc" / "_accuracy" / "_top1" / "_top5" / "_recon" of a top-k key.
ACCURACY_NAMES = ("top1", "top5", "accuracy", "train_accuracy", "zero_shot_top1", "zero_shot_top1_recon",
                  "colour_acc", "kind_acc", "judge_colour", "judge_kind", "judge_both")


def is_accuracy_key(key: str) -> bool:
    """True for keys holding an accuracy fraction (``zero_shot.top1``, ``qlip.kind_acc``, ...)."""
    last = key.rsplit(".", 1)[-1]
    return (last in ACCURACY_NAMES or last.endswith("_acc") or last.endswith("_accuracy")
            or last.startswith("top") and last[3:].isdigit() or last.startswith("zero_shot_top"))


def format_accuracy(fraction: Optional[float], digits: int = 1) -> str:
    """The one way qlip prints an accuracy: a fraction 0.631 -> ``"63.1%"`` (``"-"`` for None)."""
    if fraction is None:
        return "-"
    return f"{100.0 * float(fraction):.{digits}f}%"
