"""Resumable image-text batches from webdataset shards, a CSV file or an image folder.

    loader = webdataset_loader("data/shapes/shapes-train-{000000..000019}.tar",
                               image_transform(64, mean, std), model.tokenizer, batch_size=256,
                               seed=0, rank=rank, world_size=world, num_workers=2, infinite=True)
    for batch in loader:            # {"images": (B,3,H,W) float32, "tokens": (B,77) int64,
        ...                         #  "texts": [str], "keys": [str], "labels": (B,) int64 if any}
        ckpt["data"] = loader.state_dict()
    ...
    loader = webdataset_loader(<same arguments>); loader.load_state_dict(ckpt["data"])
    # -> exactly the batches the uninterrupted run would have produced next

How the sample order is built (everything is a function of seed, epoch, rank, world size and the
number of workers; nothing depends on timing):
1. "units" are shards (tar) or chunks of 1000 entries (CSV rows, folder images). Each epoch
   permutes them with rng(seed, epoch), identically on every rank and worker.
2. There are world_size * num_workers "consumers" (rank r, worker w -> r * W + w). With
   split="shard" consumer c reads units c, c + n, c + 2n, ... of the permuted order; with
   split="sample" it reads every unit and keeps samples c, c + n, ... Either way every sample of an
   epoch goes to exactly one consumer. split="auto" picks "shard" when the units divide evenly
   (or there are >= 8 per consumer) and "sample" otherwise.
3. A shuffle buffer seeded with (seed, epoch, rank, worker) mixes each consumer's stream; the
   buffer holds the raw (undecoded) bytes.
4. Decoding happens after the shuffle; a corrupt sample is skipped, counted and logged, and each
   consumer batches its own stream. The DataLoader hands out the workers' batches round-robin.

The position is, per worker, (epoch, number of raw samples it has consumed): to resume, each
worker replays its stream without decoding up to that point, and the worker rotation is shifted
so the next batch comes from the same worker as before. Transforms must be deterministic (no
random augmentation) for the batches to be identical after a resume.
"""
from __future__ import annotations

import collections
import copy
import csv
import glob
import http.client
import io
import itertools
import logging
import os
import random
import re
import subprocess
import tarfile
import time
import urllib.request
import zlib
from typing import Any, Callable, Generator, Iterable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from ..model.preprocess import normalize, pil_to_tensor, resize_center_crop, to_rgb
from .images import IMAGE_EXTS, decode_image, read_image_folder
from .loader_state import check_loader_args, check_loader_state, rank_state

log = logging.getLogger("qlip.data")

TEXT_EXTS = ("txt", "text", "caption")
NEG_TEXT_EXT = "neg.txt"  # optional hard-negative caption ({key}.neg.txt), as in NegCLIP
STAT_KEYS = ("samples", "skipped", "decode_errors", "incomplete", "shard_errors")
# "shard_retries" (remote shards re-opened after a failed read) joins loader.stats once one happened
STATE_VERSION = 1
MAX_WARNINGS = 20  # per worker process; later problems are only counted

Tokenizer = Callable[[list], Any]
Transform = Callable[[Image.Image], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# images


class ImageTransform:
    """PIL image -> (3, size, size) float32 tensor; see `image_transform`. A class (not a closure)
    so that it pickles into DataLoader workers."""

    def __init__(self, size: int, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 resize: Optional[int] = None, interpolation: str = "bicubic"):
        self.size, self.resize, self.interpolation = size, resize or size, interpolation
        self.mean, self.std = (list(mean), list(std)) if mean is not None else (None, None)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = pil_to_tensor(resize_center_crop(to_rgb(img), self.resize, self.size, self.interpolation))
        return normalize(x, self.mean, self.std) if self.mean is not None else x


def image_transform(size: int, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                    resize: Optional[int] = None, interpolation: str = "bicubic") -> ImageTransform:
    """RGB conversion, shorter side resized to ``resize`` (default ``size``), centre crop ``size`` x ``size``,
    (3, H, W) float32 in [0, 1], then ``(x - mean) / std`` when mean and std are given."""
    if (mean is None) != (std is None):
        raise DataError("image_transform needs both mean and std, or neither")
    return ImageTransform(size, mean, std, resize, interpolation)


# ----------------------------------------------------------------------------------------------
# sources: a list of units and a reader that turns one unit into raw samples
#
# A raw sample is a dict: key, url, and either image (bytes) or path, text, label, plus
# "missing" (a reason string) when the sample lacks a required field.


def expand_shards(shards: Union[str, os.PathLike, Sequence]) -> list[str]:
    """Shard list from a path, glob, brace pattern ("a-{000..009}.tar"), directory (its *.tar),
    "::"-separated patterns, URL / "pipe:" command, or a list of any of these."""
    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    urls: list[str] = []
    for item in items:
        for part in os.fspath(item).split("::"):
            if "{" in part:
                try:
                    from braceexpand import braceexpand
                except ImportError:
                    raise DataError("brace patterns need the braceexpand package (pip install webdataset)") from None
                expanded = list(braceexpand(part))
            else:
                expanded = [part]
            for url in expanded:
                if _is_remote(url):
                    urls.append(url)
                elif os.path.isdir(url):
                    found = sorted(glob.glob(os.path.join(url, "*.tar")) + glob.glob(os.path.join(url, "*.tar.gz")))
                    if not found:
                        raise DataError(f"{url}: directory holds no .tar shards")
                    urls += found
                elif glob.has_magic(url):
                    found = sorted(glob.glob(url))
                    if not found:
                        raise DataError(f"no shards match {url}")
                    urls += found
                elif not os.path.exists(url):
                    raise DataError(f"{url}: no such shard")
                else:
                    urls.append(url)
    if not urls:
        raise DataError("no shards given")
    return urls


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


# Remote shards (http(s)://, pipe: commands, fsspec URLs such as s3://): a failed or dropped read
# is retried REMOTE_RETRIES times (re-opened, the samples already handed out skipped), then the
# shard counts as a shard error like a truncated local one: warned about, counted in
# stats["shard_errors"], the samples read before the failure kept. Override with the environment
# variables QLIP_SHARD_RETRIES, QLIP_SHARD_TIMEOUT_S, QLIP_SHARD_RETRY_DELAY_S.
REMOTE_RETRIES = 3
REMOTE_TIMEOUT_S = 60.0
REMOTE_RETRY_DELAY_S = 1.0   # doubled after each failed attempt

# fsspec protocols and the package that implements each (for a one-line error when missing)
_FSSPEC_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
                    "abfss": "adlfs", "hf": "huggingface_hub"}


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise DataError(f"{name}={raw!r} is not a number") from None


class _CheckedHTTP(io.RawIOBase):
    """An HTTP response body that raises OSError when the connection ends before Content-Length
    bytes (http.client returns a short read silently, and a tar cut at a member boundary would
    then look complete)."""

    def __init__(self, response, url: str):
        self.response, self.url, self.received = response, url, 0
        length = response.headers.get("Content-Length")
        self.length = int(length) if length is not None and length.isdigit() else None

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        try:
            n = self.response.readinto(buf)
        except http.client.HTTPException as e:  # IncompleteRead of a chunked body, ...
            raise OSError(f"{self.url}: connection broken after {self.received} bytes ({e!r})") from None
        if n == 0 and len(buf) and self.length is not None and self.received < self.length:
            raise OSError(f"{self.url}: connection closed after {self.received} of {self.length} bytes")
        self.received += n
        return n

    def close(self) -> None:
        self.response.close()
        super().close()


class _PipeStream(io.RawIOBase):
    """stdout of a ``pipe:`` shell command; a non-zero exit status is an OSError at the end of the
    stream (a command that dies half way would otherwise look like a short, complete shard)."""

    def __init__(self, command: str, url: str):
        self.url = url
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self.proc.stdout.readinto(buf)
        if n == 0 and len(buf):
            self._check()
        return n

    def _check(self) -> None:
        err = self.proc.stderr.read().decode("utf-8", errors="replace").strip()
        code = self.proc.wait()
        if code != 0:
            raise OSError(f"{self.url}: command exited with status {code}" + (f": {err[-300:]}" if err else ""))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()
        super().close()


def _open_shard(url: str):
    """A binary stream of one shard: a local file, ``pipe:COMMAND`` (its stdout, webdataset's
    convention, e.g. ``pipe:aws s3 cp s3://bucket/shard.tar -``), ``http(s)://`` (urllib, no extra
    package) or any other fsspec URL (``s3://`` with s3fs, ``gs://`` with gcsfs, ...)."""
    if not _is_remote(url):
        return open(url, "rb")
    if url.startswith("pipe:"):
        return io.BufferedReader(_PipeStream(url[len("pipe:"):], url), 1 << 16)
    protocol = url.split("://", 1)[0].lower()
    if protocol in ("http", "https"):
        timeout = _env_number("QLIP_SHARD_TIMEOUT_S", REMOTE_TIMEOUT_S)
        response = urllib.request.urlopen(url, timeout=timeout)  # HTTPError / URLError are OSErrors
        return io.BufferedReader(_CheckedHTTP(response, url), 1 << 16)
    package = _FSSPEC_PACKAGES.get(protocol)
    try:
        import fsspec
    except ImportError:
        raise DataError(f"{url}: {protocol}:// shards need fsspec" + (f" and {package}" if package else "")
                        + f" (pip install fsspec{' ' + package if package else ''})") from None
    try:
        return fsspec.open(url, "rb").open()
    except ImportError:
        raise DataError(f"{url}: {protocol}:// shards need the {package or 'fsspec backend'} package"
                        + (f" (pip install {package})" if package else "")) from None
    except ValueError as e:  # fsspec: "Protocol not known"
        raise DataError(f"{url}: fsspec cannot open {protocol}:// ({e})") from None


# webdataset's key convention: everything up to the first dot of the file name is the key.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")


def _tar_samples(url: str, pending: dict) -> Iterator[tuple[str, dict]]:
    """Complete samples of one shard in tar order; raises on a read error. ``pending`` holds the
    sample being read (key, fields) so that the caller can keep what was read before a defect."""
    key, fields = None, {}
    with _open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            m = _KEY_EXT.match(member.name) if member.isfile() else None
            if m is None:
                continue
            if m.group(1) != key:
                if fields:
                    yield key, fields
                key, fields = m.group(1), {}
                pending.update(key=key, fields=fields)
            fields[m.group(2).lower()] = tar.extractfile(member).read()
        while stream.read(1 << 16):  # to the end: a remote stream checks its length / exit status there
            pass
    pending.clear()
    if fields:
        yield key, fields


def read_tar_samples(url: str, stats: collections.Counter,
                     warn: Callable[[str], None]) -> Generator[tuple[str, dict], None, bool]:
    """``(key, {extension: bytes})`` for each sample of one shard, streamed in tar order.

    The one tar reader of the package (training loaders and evaluation sets). A remote shard whose
    read fails is re-opened up to ``REMOTE_RETRIES`` times, the samples already handed out skipped
    (``stats["shard_retries"]`` counts the retries), so a dropped connection loses nothing. A
    shard that still cannot be read (or a local one that is truncated) counts one
    ``stats["shard_errors"]``, is reported through ``warn`` and ends early; the samples read
    before the defect are kept. The generator's return value says whether the shard was read to
    its end (True) or ended at a defect (False)."""
    remote = _is_remote(url)
    retries = int(_env_number("QLIP_SHARD_RETRIES", REMOTE_RETRIES)) if remote else 0
    delay = _env_number("QLIP_SHARD_RETRY_DELAY_S", REMOTE_RETRY_DELAY_S)
    done = 0
    for attempt in range(retries + 1):
        pending: dict = {}
        try:
            for i, sample in enumerate(_tar_samples(url, pending)):
                if i >= done:
                    done += 1
                    yield sample
            return True
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            if attempt < retries:
                stats["shard_retries"] += 1
                warn(f"shard {url}: read failed after {done} samples ({e.__class__.__name__}: {e}); "
                     f"retry {attempt + 1} of {retries}")
                time.sleep(delay * 2 ** attempt)
                continue
            stats["shard_errors"] += 1
            warn(f"shard {url} is unreadable or truncated after key {pending.get('key')}"
                 + (f" ({retries} retries)" if retries else "") + f": {e.__class__.__name__}: {e}")
            if pending.get("fields"):
                yield pending["key"], pending["fields"]
            return False
    return False  # not reached: every attempt returns or retries


class TarSource:
    """Webdataset tar shards: files sharing a key (``{key}.png``, ``{key}.txt``, ...) form a sample.

    ``label_key`` (e.g. "cls") names an extra field holding an integer label. ``cache_mb`` > 0
    keeps the samples (raw bytes) of each local shard read to its end without a defect in memory,
    up to that many MB in all, and serves later reads of it from there: the same samples in the
    same order, without tar parsing and file reads (a small dataset read for many epochs).
    """

    def __init__(self, shards, label_key: Optional[str] = None, cache_mb: int = 0):
        self.units = expand_shards(shards)
        self.label_key = label_key
        self.has_labels = label_key is not None
        self.cache_bytes = int(cache_mb) << 20
        self._cache: dict[str, list] = {}
        self._cached_bytes = 0

    def read(self, url: str, stats: collections.Counter, warn: Callable[[str], None]) -> Iterator[dict]:
        cached = self._cache.get(url)
        if cached is not None:
            for key, fields in cached:
                yield self._sample(key, url, fields)
            return
        keep = [] if self.cache_bytes and not _is_remote(url) else None
        samples = read_tar_samples(url, stats, warn)
        while True:
            try:
                key, fields = next(samples)
            except StopIteration as end:
                complete = end.value is True  # read_tar_samples: True = read to its end
                break
            if keep is not None:
                keep.append((key, fields))
            yield self._sample(key, url, fields)
        if keep is not None and complete:
            size = sum(len(v) for _, fields in keep for v in fields.values())
            if self._cached_bytes + size <= self.cache_bytes:
                self._cache[url] = keep
                self._cached_bytes += size

    def _sample(self, key: str, url: str, fields: dict) -> dict:
        image = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
        text = next((fields[e] for e in TEXT_EXTS if e in fields), None)
        neg = fields.get(NEG_TEXT_EXT)
        sample = {"key": key, "url": url, "image": image, "label": None, "missing": None,
                  "text": text.decode("utf-8", errors="replace").strip() if text is not None else None,
                  "neg_text": neg.decode("utf-8", errors="replace").strip() if neg is not None else None}
        if image is None or text is None:
            sample["missing"] = f"no {'image' if image is None else 'text'} field (has {sorted(fields)})"
        elif self.label_key is not None:
            try:
                sample["label"] = int(fields[self.label_key].decode().strip())
            except (KeyError, ValueError, UnicodeDecodeError):
                sample["missing"] = f"no integer .{self.label_key} field"
        return sample


class ListSource:
    """In-memory entries (CSV rows, folder images) split into units of ``chunk`` entries.

    Each entry is a dict with key, path, text and label (or None); the file is read at decode time.
    """

    def __init__(self, entries: Sequence[dict], origin: str, has_labels: bool = False, chunk: int = 1000):
        if not entries:
            raise DataError(f"{origin}: no samples")
        self.units = [list(entries[i:i + chunk]) for i in range(0, len(entries), chunk)]
        self.origin, self.has_labels = origin, has_labels

    def read(self, unit: list, stats: collections.Counter, warn: Callable[[str], None]) -> Iterator[dict]:
        for e in unit:
            yield {"url": self.origin, "image": None, "missing": None, **e}


def read_csv_pairs(csv_path: str, image_root: Optional[str] = None, path_column: Optional[str] = None,
                   caption_column: Optional[str] = None, sep: Optional[str] = None) -> list[tuple[str, str]]:
    """(image path, caption) rows of a CSV/TSV file.

    With a header row the columns are ``path_column`` / ``caption_column`` (default: the first of
    path, filepath, file, filename, image, image_path / caption, title, text); without one, the
    first two columns. Relative paths are resolved against ``image_root`` (default: the CSV's folder).
    """
    sep = sep or ("\t" if csv_path.endswith((".tsv", ".tab")) else ",")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f, delimiter=sep) if r]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{csv_path}: cannot read CSV ({e})") from None
    if not rows:
        raise DataError(f"{csv_path}: empty CSV")
    header = [h.strip().lower() for h in rows[0]]
    path_names = [path_column] if path_column else ["path", "filepath", "file", "filename", "image", "image_path"]
    text_names = [caption_column] if caption_column else ["caption", "title", "text"]
    pi = next((header.index(n.lower()) for n in path_names if n.lower() in header), None)
    ti = next((header.index(n.lower()) for n in text_names if n.lower() in header), None)
    if pi is not None and ti is not None:
        rows = rows[1:]
    elif path_column or caption_column or pi is not None or ti is not None:
        raise DataError(f"{csv_path}: header {rows[0]} lacks a path or caption column")
    else:
        pi, ti = 0, 1
    root = image_root or os.path.dirname(os.path.abspath(csv_path))
    out = []
    for n, r in enumerate(rows):
        if len(r) <= max(pi, ti):
            raise DataError(f"{csv_path}: row {n + 1} has {len(r)} columns, expected a path and a caption")
        out.append((os.path.join(root, r[pi].strip()), r[ti].strip()))
    return out


# ----------------------------------------------------------------------------------------------
# the per-consumer stream (runs inside each DataLoader worker)


def _shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Deterministic shuffle buffer: fill ``size`` items, then emit a random one per new item."""
    buf = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class _Stream(IterableDataset):
    """Yields messages {worker, epoch, consumed, done, stats, batch} for one consumer.

    ``start[w] = [epoch, consumed, done]`` is where logical worker w resumes; physical worker p
    plays logical worker (p + offset) % W so the round-robin continues with the right worker.
    """

    def __init__(self, loader: "PairLoader"):
        self.source, self.transform, self.tokenizer = loader.source, loader.transform, loader.tokenizer
        self.batch_size, self.seed, self.rank, self.world_size = loader.batch_size, loader.seed, loader.rank, loader.world_size
        self.shuffle, self.shuffle_buffer, self.infinite = loader.shuffle, loader.shuffle_buffer, loader.infinite
        self.drop_last, self.split = loader.drop_last, loader.split
        self.cache_bytes, self._decoded, self._decoded_bytes = loader.cache_bytes, {}, 0
        self.start: list = []
        self.offset = 0
        self._warnings = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        logical = ((info.id if info is not None else 0) + self.offset) % num_workers
        return self._messages(logical, num_workers)

    def _warn(self, msg: str) -> None:
        self._warnings += 1
        if self._warnings <= MAX_WARNINGS:
            log.warning("qlip.data: %s", msg)
        if self._warnings == MAX_WARNINGS:
            log.warning("qlip.data: further problems in this worker are counted but not logged")

    def _raw(self, epoch: int, logical: int, num_workers: int, stats: collections.Counter) -> Iterator[dict]:
        """This consumer's raw samples of one epoch, in their final (shuffled) order."""
        units = self.source.units
        order = list(range(len(units)))
        if self.shuffle:
            random.Random(f"qlip-units-{self.seed}-{epoch}").shuffle(order)
        consumer, n = self.rank * num_workers + logical, self.world_size * num_workers

        def read(indices):
            return itertools.chain.from_iterable(self.source.read(units[i], stats, self._warn) for i in indices)

        if self.split == "shard":
            stream = read(order[consumer::n])
        else:
            stream = (x for i, x in enumerate(read(order)) if i % n == consumer)
        if self.shuffle and self.shuffle_buffer > 1:
            stream = _shuffled(stream, self.shuffle_buffer,
                               random.Random(f"qlip-buffer-{self.seed}-{epoch}-{self.rank}-{logical}"))
        return stream

    def _decode(self, raw: dict, stats: collections.Counter) -> Optional[tuple]:
        where = f"{raw['key']} in {raw['url']}"
        if raw["missing"]:
            stats["incomplete"] += 1
            stats["skipped"] += 1
            self._warn(f"skipping sample {where}: {raw['missing']}")
            return None
        x = self._decoded.get((raw["url"], raw["key"]))
        if x is None:
            try:
                img = decode_image(raw["image"] if raw["image"] is not None else raw["path"])
            except Exception as e:  # noqa: BLE001 - image decoders raise many types; one bad file must not stop a run
                stats["decode_errors"] += 1
                stats["skipped"] += 1
                self._warn(f"skipping sample {where}: undecodable image ({e.__class__.__name__}: {e})")
                return None
            x = self.transform(img)
            size = x.numel() * x.element_size() if isinstance(x, torch.Tensor) else None
            if size is not None and self._decoded_bytes + size <= self.cache_bytes:
                self._decoded[(raw["url"], raw["key"])] = x  # collate stacks (copies) it: never handed out
                self._decoded_bytes += size
        stats["samples"] += 1
        return x, raw["text"], raw["label"], raw["key"], raw.get("neg_text")

    def _samples(self, logical: int, num_workers: int, stats: collections.Counter) -> Iterator[tuple]:
        """(decoded sample or None, epoch, position) from the start position on; position counts
        raw samples of the epoch, so replaying up to it needs no decoding."""
        epoch, skip, done = self.start[logical]
        if done:
            return
        while True:
            pos = decoded = 0
            for raw in self._raw(epoch, logical, num_workers, stats):
                pos += 1
                if pos <= skip:
                    if pos == skip:
                        stats.clear()  # what was counted so far is already in the saved stats
                    continue
                item = self._decode(raw, stats)
                decoded += item is not None
                yield item, epoch, pos
            if pos < skip:
                log.warning("qlip.data: worker %d of rank %d: epoch %d has %d samples, fewer than the %d "
                            "consumed before the resume (did the data change?)", logical, self.rank, epoch, pos, skip)
            if not self.infinite:
                return
            if pos > skip and decoded == 0:
                raise DataError(f"no decodable sample for rank {self.rank} worker {logical} in epoch {epoch}")
            if pos == 0:
                raise DataError(f"rank {self.rank} worker {logical} gets no samples "
                                f"({len(self.source.units)} units for {self.world_size * num_workers} consumers)")
            epoch, skip = epoch + 1, 0

    def _collate(self, items: list) -> dict:
        images, texts, labels, keys, negs = zip(*items)
        batch = {"images": torch.stack(images), "texts": list(texts), "keys": list(keys)}
        if self.tokenizer is not None:
            batch["tokens"] = torch.as_tensor(self.tokenizer(list(texts)), dtype=torch.long)
        if all(n is not None for n in negs):  # every sample ships a hard-negative caption
            batch["neg_texts"] = list(negs)
            if self.tokenizer is not None:
                batch["neg_tokens"] = torch.as_tensor(self.tokenizer(list(negs)), dtype=torch.long)
        if self.source.has_labels:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch

    def _messages(self, logical: int, num_workers: int) -> Iterator[dict]:
        stats = collections.Counter()
        epoch, pos = self.start[logical][:2]
        items = []

        def message(batch, done=False):
            msg = {"worker": logical, "epoch": epoch, "consumed": pos, "done": done, "stats": dict(stats), "batch": batch}
            stats.clear()
            return msg

        for item, epoch, pos in self._samples(logical, num_workers, stats):
            if item is not None:
                items.append(item)
            if len(items) == self.batch_size:
                yield message(self._collate(items))
                items = []
        if self.start[logical][2]:
            return  # this worker had already finished the epoch
        if items and not self.drop_last:
            yield message(self._collate(items))
        yield message(None, done=True)  # end of epoch: final position and counts


# ----------------------------------------------------------------------------------------------
# the loader


class PairLoader:
    """Iterates batches of a source; resumable via state_dict() / load_state_dict().

    Epoch mode (``infinite=False``): one ``for`` loop is one epoch (or what remains of it); the
    next loop starts the next epoch. Infinite mode: one endless loop, each worker moving on to its
    next epoch by itself (no sample is dropped at epoch ends). Breaking out of a loop and starting
    a new one continues where the last batch left off. Only one iterator may be active at a time.

    ``stats``: samples decoded, skipped (= decode_errors + incomplete), shard_errors; counts cover
    the batches handed out so far and survive a resume.

    ``cache_mb`` > 0 keeps each decoded image (the transform's output; transforms here are
    deterministic) in memory, up to that many MB, keyed by its unit and key: later epochs of a small
    dataset skip decoding, with the same batches (each process keeps its own; with ``num_workers`` > 0
    a worker's cache lives as long as the worker).
    """

    def __init__(self, source, transform: Transform, tokenizer: Optional[Tokenizer] = None, batch_size: int = 256, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 2000, infinite: bool = False, drop_last: bool = True, split: str = "auto",
                 pin_memory: bool = False, prefetch_factor: int = 2, cache_mb: int = 0):
        check_loader_args(batch_size, rank, world_size)
        if cache_mb < 0:
            raise DataError(f"cache_mb must be >= 0, got {cache_mb}")
        self.cache_bytes = int(cache_mb) << 20
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}")
        if split not in ("auto", "shard", "sample"):
            raise DataError(f"split must be auto, shard or sample, got {split!r}")
        self.source, self.transform, self.tokenizer = source, transform, tokenizer
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.shuffle, self.shuffle_buffer = num_workers, shuffle, shuffle_buffer
        self.infinite, self.drop_last, self.pin_memory, self.prefetch_factor = infinite, drop_last, pin_memory, prefetch_factor
        consumers = world_size * max(1, num_workers)
        n_units = len(source.units)
        if split == "auto":
            split = "shard" if n_units % consumers == 0 or n_units >= 8 * consumers else "sample"
        if split == "shard" and not infinite and n_units < consumers:
            log.warning("qlip.data: %d units for %d consumers: some workers get no data", n_units, consumers)
        self.split = split
        self.classnames: Optional[list[str]] = None
        self.stats = {k: 0 for k in STAT_KEYS}
        self.batches = 0  # handed out since the start of training (survives resume)
        self._stream = _Stream(self)
        self.set_epoch(0)

    # -- position -------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Current epoch (in infinite mode: the lowest epoch any worker is still in)."""
        return min(w[0] for w in self._workers)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning on the next iteration."""
        self._workers = [[epoch, 0, False] for _ in range(max(1, self.num_workers))]
        self._next_worker = 0

    def state_dict(self) -> dict:
        """Position after the last batch handed out; save it with the model checkpoint."""
        return {"version": STATE_VERSION, **self._settings(), "workers": copy.deepcopy(self._workers),
                "next_worker": self._next_worker, "batches": self.batches, "stats": dict(self.stats)}

    def load_state_dict(self, state: Union[dict, Sequence[dict]]) -> None:
        """Restore a position from `state_dict()` (or from a list of every rank's states).

        The loader must be built with the same data, seed, batch size, world size, rank and number
        of workers; otherwise the batches would differ, and this raises DataError.
        """
        state = rank_state(state, self.rank, "loader")
        check_loader_state(state, STATE_VERSION, self._settings(), "loader")
        self._workers = copy.deepcopy(state["workers"])
        self._next_worker, self.batches = state["next_worker"], state["batches"]
        self.stats = {k: state["stats"].get(k, 0) for k in STAT_KEYS}
        self.stats.update({k: v for k, v in state["stats"].items() if k not in STAT_KEYS})

    def _settings(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "num_workers": self.num_workers,
                "batch_size": self.batch_size, "infinite": self.infinite, "drop_last": self.drop_last,
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "split": self.split,
                "num_units": len(self.source.units)}

    # -- iteration ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        if all(w[2] for w in self._workers):  # the last epoch was completed
            self.set_epoch(self._workers[0][0] + 1)
        stream = self._stream
        stream.start, stream.offset = copy.deepcopy(self._workers), self._next_worker
        if self.num_workers > 0:
            messages = iter(DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                       pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor))
        else:
            messages = iter(stream)
        for msg in messages:
            w = msg["worker"]
            self._workers[w] = [msg["epoch"], msg["consumed"], msg["done"]]
            self._next_worker = (w + 1) % len(self._workers)
            for k, v in msg["stats"].items():
                self.stats[k] = self.stats.get(k, 0) + v
            if msg["batch"] is not None:
                self.batches += 1
                yield msg["batch"]
        if self.stats["skipped"] or self.stats["shard_errors"]:
            log.warning("qlip.data: after epoch %d: skipped %d samples (%d undecodable, %d incomplete), "
                        "%d shard errors", self.epoch, self.stats["skipped"], self.stats["decode_errors"],
                        self.stats["incomplete"], self.stats["shard_errors"])


# ----------------------------------------------------------------------------------------------
# constructors


def webdataset_loader(shards, transform: Transform, tokenizer: Optional[Tokenizer] = None, batch_size: int = 256, *,
                      label_key: Optional[str] = None, cache_mb: int = 0, **options) -> PairLoader:
    """Loader over webdataset tar shards (``{key}.jpg|png|...`` + ``{key}.txt``, optional
    ``{key}.<label_key>`` integer label); ``cache_mb`` > 0 keeps up to that many MB of decoded images
    (`PairLoader`) and, within the same figure, the shards' raw samples (`TarSource`) in memory.
    ``options`` are PairLoader's keyword arguments."""
    return PairLoader(TarSource(shards, label_key=label_key, cache_mb=cache_mb), transform, tokenizer, batch_size,
                      cache_mb=cache_mb, **options)


def csv_loader(csv_path: str, transform: Transform, tokenizer: Optional[Tokenizer] = None, batch_size: int = 256, *,
               image_root: Optional[str] = None, path_column: Optional[str] = None,
               caption_column: Optional[str] = None, sep: Optional[str] = None, **options) -> PairLoader:
    """Loader over a CSV/TSV of (image path, caption) rows; see `read_csv_pairs`."""
    rows = read_csv_pairs(csv_path, image_root, path_column, caption_column, sep)
    entries = [{"key": p, "path": p, "text": t, "label": None} for p, t in rows]
    return PairLoader(ListSource(entries, csv_path), transform, tokenizer, batch_size, **options)


def image_folder_loader(root: str, transform: Transform, tokenizer: Optional[Tokenizer] = None, batch_size: int = 256,
                        *, caption_template: str = "a photo of a {}", **options) -> PairLoader:
    """Loader over ``root/<class>/<image>``: labels are class indices (sorted names, ``loader.classnames``),
    texts are ``caption_template`` filled with the class name (underscores as spaces)."""
    items, classnames = read_image_folder(root)
    entries = [{"key": os.path.relpath(p, root), "path": p, "label": y,
                "text": caption_template.format(classnames[y].replace("_", " "))} for p, y in items]
    loader = PairLoader(ListSource(entries, root, has_labels=True), transform, tokenizer, batch_size, **options)
    loader.classnames = classnames
    return loader
