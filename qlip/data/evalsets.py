"""Evaluation sets: image folders and labelled webdataset shards, read in order as batches.

Where ``pipeline`` streams shuffled, resumable image-text batches for training, these read a
finite set of images once, in a fixed order, with integer labels, for ``qlip eval`` and the
demo. Both read through the same pieces: ``images`` (extensions, folder walking, decoding) and
the pipeline's tar reader (``read_tar_samples``) and shard expansion (``expand_shards``).

Two on-disk layouts are understood:

* an image folder. With sub-folders, each sub-folder is a class (sorted by name, as torchvision's
  ``ImageFolder`` and the usual ImageNet ``val/n01440764/...`` layout); images directly in the
  root are then ignored. Without sub-folders, the images in the root are read unlabelled
  (label ``-1``), which is enough for reconstruction and code statistics.
* labelled webdataset shards: one ``.tar`` file, a folder of them, a glob or a brace pattern.
  A sample is the group of members sharing a key; it needs one image member (any of
  ``images.IMAGE_EXTS``) and, for labels, a ``cls`` member holding an integer.

Images are decoded one batch at a time: no whole-dataset image tensor is ever built.
Unreadable images and shards are skipped and counted (``dataset.skipped``) and a warning is
printed at the end of a pass; they are never fatal.
"""
from __future__ import annotations

import collections
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
from PIL import Image

from ..errors import DataError
from .images import IMAGE_EXTS, decode_image, find_images, read_image_folder
from .pipeline import expand_shards, read_tar_samples

Batch = Tuple[torch.Tensor, torch.Tensor]
Preprocess = Callable[[list], torch.Tensor]
_UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)  # PIL's UnidentifiedImageError is an OSError


class EvalDataset:
    """Base class: a sized or unsized stream of ``(PIL image, label)`` pairs, read in batches.

    ``classes`` holds the class folder names (or ``None`` when the data carries no class names);
    ``labelled`` tells whether the labels are meaningful (``-1`` otherwise).
    """

    classes: Optional[List[str]] = None
    labelled: bool = False

    def __init__(self) -> None:
        self.skipped = 0
        self.skipped_names: List[str] = []  # the first few unreadable images of the last pass
        self.problems: List[str] = []  # unreadable shards of the last pass

    def _skip(self, name: str) -> None:
        """Count an unreadable sample, keeping the first few names for the warning."""
        self.skipped += 1
        if len(self.skipped_names) < 3:
            self.skipped_names.append(name)

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} has no known length")

    def num_samples(self) -> Optional[int]:
        """Number of samples if known without reading the data, else ``None``."""
        return None

    def iter_pil(self, limit: Optional[int] = None) -> Iterator[Tuple[Image.Image, int]]:  # pragma: no cover
        """Yield ``(RGB PIL image, label)``; ``limit`` is a hint to choose which images to read."""
        raise NotImplementedError

    def fingerprint(self) -> str:  # pragma: no cover - overridden
        """A string that changes when the data changes (used to key cached FID statistics)."""
        raise NotImplementedError

    def batches(self, preprocess: Preprocess, batch_size: int = 32, limit: Optional[int] = None,
                progress: bool = False, desc: str = "images") -> Iterator[Batch]:
        """Yield ``(images, labels)``: ``preprocess(list_of_pil)`` and an int64 label tensor.

        ``limit``: an image folder reads a fixed (seed 0) random subset of ``limit`` images, in
        folder order, so that every class is represented; shards read their first ``limit`` images.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        total = self.num_samples()
        if limit is not None:
            total = limit if total is None else min(total, limit)
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False)
        self.skipped, self.skipped_names, self.problems = 0, [], []
        pils: List[Image.Image] = []
        labels: List[int] = []
        seen = 0
        try:
            for img, label in self.iter_pil(limit):
                if limit is not None and seen >= limit:
                    break
                pils.append(img)
                labels.append(label)
                seen += 1
                if len(pils) == batch_size:
                    yield preprocess(pils), torch.tensor(labels, dtype=torch.int64)
                    bar.update(len(pils))
                    pils, labels = [], []
            if pils:
                yield preprocess(pils), torch.tensor(labels, dtype=torch.int64)
                bar.update(len(pils))
        finally:
            bar.close()
        if self.skipped:
            names = ", ".join(self.skipped_names[:3]) + (", ..." if self.skipped > 3 else "")
            warnings.warn(f"skipped {self.skipped} unreadable image(s) in {self.describe()}: {names}", stacklevel=2)
        for problem in self.problems:
            warnings.warn(problem, stacklevel=2)
        if seen == 0:
            raise DataError(f"{self.describe()}: no readable images")

    def describe(self) -> str:
        return type(self).__name__


class ImageFolderDataset(EvalDataset):
    """Images in a folder; one class per sub-folder (sorted), or unlabelled images in the root."""

    def __init__(self, root: Union[str, os.PathLike]) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"{self.root}: no such file or folder")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder (expected an image folder or .tar shards)")
        entries = [p for p in self.root.iterdir() if not p.name.startswith(".")]
        if not entries:
            raise DataError(f"{self.root}: folder is empty")
        if any(p.is_dir() for p in entries):
            items, self.classes = read_image_folder(str(self.root))
            self.labelled = True
            self.samples: List[Tuple[Path, int]] = [(Path(p), label) for p, label in items]
        else:
            images = find_images(str(self.root), recursive=False)
            if not images:
                raise DataError(f"{self.root}: no image files among {len(entries)} file(s) "
                                f"(expected {', '.join(IMAGE_EXTS)} or class sub-folders)")
            self.classes = None
            self.labelled = False
            self.samples = [(Path(p), -1) for p in images]

    def __len__(self) -> int:
        return len(self.samples)

    def num_samples(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        return str(self.root)

    def subset(self, limit: Optional[int] = None) -> List[Tuple[Path, int]]:
        """All samples, or a fixed random subset (seed 0, kept in folder order) of ``limit``."""
        if limit is None or limit >= len(self.samples):
            return self.samples
        gen = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(self.samples), generator=gen)[:limit].sort().values.tolist()
        return [self.samples[i] for i in keep]

    def iter_pil(self, limit: Optional[int] = None) -> Iterator[Tuple[Image.Image, int]]:
        for path, label in self.subset(limit):
            try:
                img = decode_image(path)
            except _UNREADABLE:
                self._skip(str(path))
                continue
            yield img, label

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(self.root.resolve()).encode())
        for path, label in self.samples:
            h.update(f"{path.relative_to(self.root)}\0{path.stat().st_size}\0{label}\n".encode())
        return h.hexdigest()


class ShardDataset(EvalDataset):
    """Labelled webdataset shards (``{key}.jpg|png|...`` + ``{key}.cls``), streamed in order.

    Samples without an image are skipped (counted); samples without ``cls`` get label ``-1``.
    ``classes`` is ``None``: class names must be supplied by the caller.
    """

    def __init__(self, spec: Union[str, os.PathLike]) -> None:
        super().__init__()
        self.spec = str(spec)
        self.shards = expand_shards(self.spec)
        self.classes = None
        self.labelled = True

    def describe(self) -> str:
        return self.spec

    def iter_pil(self, limit: Optional[int] = None) -> Iterator[Tuple[Image.Image, int]]:
        stats: collections.Counter = collections.Counter()
        for url in self.shards:
            for key, fields in read_tar_samples(url, stats, self.problems.append):
                data = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
                if data is None:
                    self._skip(f"{url}:{key} (no image)")
                    continue
                try:
                    img = decode_image(data)
                except _UNREADABLE:
                    self._skip(f"{url}:{key}")
                    continue
                label = -1
                if "cls" in fields:
                    try:
                        label = int(fields["cls"].decode().strip())
                    except (ValueError, UnicodeDecodeError):
                        raise DataError(f"{url}: sample {key} has a non-integer .cls") from None
                yield img, label

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for shard in self.shards:
            if os.path.isfile(shard):
                st = os.stat(shard)
                h.update(f"{os.path.realpath(shard)}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
            else:  # a remote shard: its address is all we know without reading it
                h.update(f"{shard}\n".encode())
        return h.hexdigest()


def open_dataset(path: Union[str, os.PathLike]) -> EvalDataset:
    """Open an image folder or webdataset shards (a ``.tar``, a folder of them, or a glob / brace pattern)."""
    p = Path(path)
    if p.is_dir():
        has_tars = any(p.glob("*.tar")) or any(p.glob("*.tar.gz"))
        if has_tars and not any(c.is_dir() for c in p.iterdir()):
            return ShardDataset(p)
        return ImageFolderDataset(p)
    if p.is_file() and p.name.endswith((".tar", ".tar.gz")):
        return ShardDataset(p)
    if p.exists():
        raise DataError(f"{p}: expected an image folder or webdataset .tar shards")
    if any(ch in str(path) for ch in "*?[{"):
        return ShardDataset(path)
    raise DataError(f"{p}: no such file or folder")
