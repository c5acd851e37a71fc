"""Evaluation inputs: image folders and labelled webdataset shards, read as streaming batches.

Two on-disk layouts are understood:

* an image folder. With sub-folders, each sub-folder is a class (sorted by name, as torchvision's
  ``ImageFolder`` and the usual ImageNet ``val/n01440764/...`` layout); images directly in the
  root are then ignored. Without sub-folders, the images in the root are read unlabelled
  (label ``-1``), which is enough for reconstruction and code statistics.
* labelled webdataset shards: one ``.tar`` file, a folder of ``.tar`` files or a glob pattern.
  A sample is the group of members sharing a key (the member path up to the first dot of its
  file name); it needs one image member (``jpg``/``jpeg``/``png``/``webp``) and, for labels, a
  ``cls`` member holding an integer.

Images are decoded one batch at a time: no whole-dataset image tensor is ever built.
Unreadable images are skipped and counted (``dataset.skipped``) and a warning is printed at the
end of a pass; they are never fatal.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import tarfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from qlip.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

Batch = tuple[torch.Tensor, torch.Tensor]
Preprocess = Callable[[list], torch.Tensor]


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _open_rgb(source) -> Image.Image:
    """Decode an image (path or file object) fully and convert it to RGB."""
    with Image.open(source) as img:
        img.load()
        return img.convert("RGB")


class EvalDataset:
    """Base class: a sized or unsized stream of ``(PIL image, label)`` pairs, read in batches.

    ``classes`` holds the class folder names (or ``None`` when the data carries no class names);
    ``labelled`` tells whether the labels are meaningful (``-1`` otherwise).
    """

    classes: Optional[list[str]] = None
    labelled: bool = False

    def __init__(self) -> None:
        self.skipped = 0

    def __len__(self) -> int:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} has no known length")

    def num_samples(self) -> Optional[int]:
        """Number of samples if known without reading the data, else ``None``."""
        return None

    def iter_pil(self, limit: Optional[int] = None) -> Iterator[tuple[Image.Image, int]]:  # pragma: no cover
        """Yield ``(RGB PIL image, label)``; ``limit`` is a hint to choose which images to read."""
        raise NotImplementedError

    def fingerprint(self) -> str:  # pragma: no cover - overridden
        """A string that changes when the data changes (used to key cached FID statistics)."""
        raise NotImplementedError

    def batches(
        self,
        preprocess: Preprocess,
        batch_size: int = 32,
        limit: Optional[int] = None,
        progress: bool = False,
        desc: str = "images",
    ) -> Iterator[Batch]:
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
        self.skipped = 0
        pils: list[Image.Image] = []
        labels: list[int] = []
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
            warnings.warn(f"skipped {self.skipped} unreadable image(s) in {self.describe()}", stacklevel=2)
        if seen == 0:
            raise DataError(f"{self.describe()}: no readable images")

    def describe(self) -> str:
        return type(self).__name__


class ImageFolderDataset(EvalDataset):
    """Images in a folder; one class per sub-folder (sorted), or unlabelled images in the root."""

    def __init__(self, root: str | os.PathLike) -> None:
        super().__init__()
        self.root = Path(root)
        if not self.root.exists():
            raise DataError(f"{self.root}: no such file or folder")
        if not self.root.is_dir():
            raise DataError(f"{self.root}: not a folder (expected an image folder or .tar shards)")
        entries = [p for p in self.root.iterdir() if not p.name.startswith(".")]
        if not entries:
            raise DataError(f"{self.root}: folder is empty")
        subdirs = sorted(p for p in entries if p.is_dir())
        self.samples: list[tuple[Path, int]] = []
        if subdirs:
            self.classes = [d.name for d in subdirs]
            self.labelled = True
            for label, d in enumerate(subdirs):
                files = sorted(p for p in d.rglob("*") if p.is_file() and _is_image(p))
                if not files:
                    raise DataError(f"{d}: class folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
                self.samples.extend((p, label) for p in files)
        else:
            files = sorted(p for p in entries if p.is_file())
            images = [p for p in files if _is_image(p)]
            if not images:
                raise DataError(
                    f"{self.root}: no image files among {len(files)} file(s) "
                    f"(expected {', '.join(IMAGE_EXTENSIONS)} or class sub-folders)"
                )
            self.classes = None
            self.labelled = False
            self.samples = [(p, -1) for p in images]

    def __len__(self) -> int:
        return len(self.samples)

    def num_samples(self) -> int:
        return len(self.samples)

    def describe(self) -> str:
        return str(self.root)

    def subset(self, limit: Optional[int] = None) -> list[tuple[Path, int]]:
        """All samples, or a fixed random subset (seed 0, kept in folder order) of ``limit``."""
        if limit is None or limit >= len(self.samples):
            return self.samples
        gen = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(self.samples), generator=gen)[:limit].sort().values.tolist()
        return [self.samples[i] for i in keep]

    def iter_pil(self, limit: Optional[int] = None) -> Iterator[tuple[Image.Image, int]]:
        for path, label in self.subset(limit):
            try:
                img = _open_rgb(path)
            except (UnidentifiedImageError, OSError, ValueError):
                self.skipped += 1
                continue
            yield img, label

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(str(self.root.resolve()).encode())
        for path, label in self.samples:
            h.update(f"{path.relative_to(self.root)}\0{path.stat().st_size}\0{label}\n".encode())
        return h.hexdigest()


def _expand_shards(spec: str | os.PathLike) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(str(spec)) if p.endswith(".tar"))


class ShardDataset(EvalDataset):
    """Labelled webdataset shards (``{key}.jpg|png`` + ``{key}.cls``), streamed with ``tarfile``.

    Samples without an image are skipped (counted); samples without ``cls`` get label ``-1``.
    ``classes`` is ``None``: class names must be supplied by the caller.
    """

    def __init__(self, spec: str | os.PathLike) -> None:
        super().__init__()
        self.spec = str(spec)
        self.shards = _expand_shards(spec)
        if not self.shards:
            raise DataError(f"{spec}: no .tar shards found")
        self.classes = None
        self.labelled = True

    def describe(self) -> str:
        return self.spec

    def _groups(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        for shard in self.shards:
            try:
                tar = tarfile.open(shard, "r|*")
            except (tarfile.TarError, OSError) as exc:
                raise DataError(f"{shard}: not a readable tar file ({exc})") from None
            with tar:
                key, group = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    dirname, base = os.path.split(member.name)
                    if "." not in base:
                        continue
                    stem, ext = base.split(".", 1)
                    mkey = os.path.join(dirname, stem)
                    if mkey != key:
                        if group:
                            yield key, group
                        key, group = mkey, {}
                    fobj = tar.extractfile(member)
                    if fobj is not None:
                        group[ext.lower()] = fobj.read()
                if group:
                    yield key, group

    def iter_pil(self, limit: Optional[int] = None) -> Iterator[tuple[Image.Image, int]]:
        for key, group in self._groups():
            data = next((group[k] for k in _SHARD_IMAGE_KEYS if k in group), None)
            if data is None:
                self.skipped += 1
                continue
            try:
                img = _open_rgb(io.BytesIO(data))
            except (UnidentifiedImageError, OSError, ValueError):
                self.skipped += 1
                continue
            label = -1
            if "cls" in group:
                try:
                    label = int(group["cls"].decode().strip())
                except ValueError:
                    raise DataError(f"{self.spec}: sample {key} has a non-integer .cls") from None
            yield img, label

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for shard in self.shards:
            st = shard.stat()
            h.update(f"{shard.resolve()}\0{st.st_size}\0{int(st.st_mtime)}\n".encode())
        return h.hexdigest()


def open_dataset(path: str | os.PathLike) -> EvalDataset:
    """Open an image folder or webdataset shards (a ``.tar``, a folder of them, or a glob)."""
    p = Path(path)
    if p.is_dir():
        if any(p.glob("*.tar")) and not any(c.is_dir() for c in p.iterdir()):
            return ShardDataset(p)
        return ImageFolderDataset(p)
    if p.is_file() and p.suffix == ".tar":
        return ShardDataset(p)
    if p.exists():
        raise DataError(f"{p}: expected an image folder or webdataset .tar shards")
    if any(ch in str(path) for ch in "*?["):
        return ShardDataset(path)
    raise DataError(f"{p}: no such file or folder")


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


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Map model-normalised images back to [0, 1] (inverse normalisation, then clamp)."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0)


def to_jsonable(obj):
    """Convert tensors / numpy scalars / paths inside nested containers to JSON types."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN / Infinity
    return obj


def dumps(obj) -> str:
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=False)
