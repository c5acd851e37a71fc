"""Token shards: image-text tar shards tokenized once by a QLIP, stored as memory-mapped id arrays.

Training a language model on visual tokens should not run the tokenizer at every step. ``qlip
data tokenize SHARDS --model M --out DIR`` runs the model once over webdataset shards and writes,
for input shard number ``i`` (its position in the expanded shard list):

    DIR/tokens-{i:06d}.npy     int32 [N_i, h*w] token ids (int64 if the model has > 31 bits),
                               a plain .npy: np.load(path, mmap_mode="r") maps it without reading
    DIR/tokens-{i:06d}.jsonl   N_i lines {"key": ..., "caption": ...}, row j <-> line j
    DIR/tokens-{i:06d}.json    the part's marker: counts, skipped samples, source shard. Written
                               last, so its presence means the part is complete
    DIR/config.json            what the run is (model fingerprint, preprocessing, source list),
                               written before any part
    DIR/index.json             the manifest of the whole directory (every part, totals), written
                               once all parts exist; readers only trust this file

Output shards are aligned with input shards (one part per tar). A part is the unit of work and of
resumption: it is tokenized in memory and its three files are each written atomically (temporary
file + ``os.replace``), the marker last. A run killed at any point (SIGKILL included) and started
again with the same command skips the parts whose marker exists and redoes the others from their
first sample, so no sample is lost or written twice; at most one input shard per process is
tokenized again. Alignment (rather than fixed-size chunks of the sample stream) makes a part a
pure function of its input shard: parts are independent of the number of ranks, workers or
restarts, and a part can be redone without reading any other shard.

Ranks: with ``RANK`` / ``WORLD_SIZE`` in the environment (torchrun; no process group is used),
rank ``r`` handles the input shards ``i`` with ``i % WORLD_SIZE == r``. Since parts depend only on
their input shard, two ranks write exactly the files one rank would. Each rank, when done, checks
whether every part exists and if so writes ``index.json`` (the content is deterministic, so two
ranks writing it at once is harmless); ``--merge-index`` rebuilds it from the parts, without a
model.

Corrupt samples (undecodable image bytes, a missing image or caption field) are skipped and
counted per part and in the index (``skipped`` = ``decode_errors`` + ``incomplete``); a truncated
tar keeps the samples before the damage (``shard_errors``).

Reading: :class:`TokenShardDataset` (random access over the memory maps) and :class:`TokenLoader`
(shuffled, rank-sliced, exactly resumable batches ``{"ids", "captions", "keys"}``).

Test hook: ``QLIP_TOKENS_TEST_DELAY=<seconds>`` sleeps after each written part, so that a test can
kill the process between parts.
"""
from __future__ import annotations

import collections
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError
from ..io import atomic_path, atomic_write_text
from .loader_state import check_loader_args, check_loader_state, rank_state
from .pipeline import TarSource, decode_image, expand_shards, image_transform

log = logging.getLogger("qlip.data")

FORMAT = "qlip-token-shards"
FORMAT_VERSION = 1
CONFIG = "config.json"
INDEX = "index.json"
PART = "tokens-{:06d}"
_PART_RE = re.compile(r"^\.?tokens-(\d{6})\.")
DELAY_ENV = "QLIP_TOKENS_TEST_DELAY"
PART_STATS = ("decode_errors", "incomplete", "shard_errors")
LOADER_STATE_VERSION = 1
MAX_WARNINGS = 20


# ----------------------------------------------------------------------------------------------
# identity of a run


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def encoder_fingerprint(model) -> str:
    """sha256 of what decides a model's token ids: the vision and quantizer configs and the
    weights of the vision tower and the bottleneck (the decoder and the text tower do not matter,
    so a stage-2 model with a retrained decoder tokenizes into the same shards)."""
    cfg = model.config.to_dict()
    h = hashlib.sha256(json.dumps({k: cfg[k] for k in ("vision", "quantizer")}, sort_keys=True).encode())
    state = model.state_dict()
    for name in sorted(k for k in state if k.startswith(("visual.", "bottleneck."))):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def preprocess_spec(model, mode: str = "train") -> dict:
    """The image transform of a run, as ``image_transform`` arguments.

    ``"train"`` (default): ``image_transform(model.image_size, model.image_mean, model.image_std)``,
    the transform the trainer feeds the model (shorter side resized to the image size, centre crop,
    bicubic). ``"model"``: the model's own inference preprocessing (``model.preprocess``: resize and
    crop from its config, e.g. resize 392 / crop 256 for qlip-b-8-256). Both agree for models whose
    config has ``resize == crop == image_size``."""
    if mode == "train":
        return {"mode": mode, "size": model.image_size, "resize": model.image_size,
                "mean": list(model.image_mean), "std": list(model.image_std), "interpolation": "bicubic"}
    if mode == "model":
        pp = model.config.preprocess
        return {"mode": mode, "size": pp.crop, "resize": pp.resize, "mean": list(pp.mean), "std": list(pp.std),
                "interpolation": pp.interpolation}
    raise DataError(f"preprocess must be 'train' or 'model', got {mode!r}")


def _transform(spec: dict):
    return image_transform(spec["size"], spec["mean"], spec["std"], resize=spec["resize"],
                           interpolation=spec["interpolation"])


def _source_name(url: str) -> str:
    return url if (url.startswith("pipe:") or "://" in url) else os.path.abspath(url)


def run_config(model, model_name: str, sources: Sequence[str], preprocess: str = "train") -> dict:
    """The content of ``config.json``: everything two runs must share to write the same parts."""
    spec = preprocess_spec(model, preprocess)
    bits = model.num_bits
    cfg = {"format": FORMAT, "version": FORMAT_VERSION,
           "model": {"name": str(model_name), "encoder_sha256": encoder_fingerprint(model),
                     "config_sha256": _sha256_json(model.config.to_dict())},
           "bits": bits, "grid": [model.grid, model.grid], "dtype": "int32" if bits <= 31 else "int64",
           "preprocess": spec, "sources": [_source_name(u) for u in sources]}
    cfg["fingerprint"] = _config_fingerprint(cfg)
    return cfg


def _config_fingerprint(cfg: dict) -> str:
    """What identifies a run's parts: format, bits, grid, preprocessing, sources and the encoder."""
    ident = {k: cfg[k] for k in ("format", "version", "bits", "grid", "dtype", "preprocess", "sources")}
    ident["encoder_sha256"] = cfg["model"].get("encoder_sha256")
    return _sha256_json(ident)


def filter_token_shards(src: str, dst: str, keep: Callable[[str], bool], what: str) -> int:
    """Copy the rows of the token shards ``src`` whose caption satisfies ``keep`` into ``dst`` (one
    part, replaced if it exists) and return their number. ``what`` names the filter: it becomes the
    part's source (``"SRC (what)"``), and the subset's fingerprint is that of ``src``'s fingerprint
    and ``what`` (``filtered_from`` keeps the former), so a run trained on it is never mistaken for
    one trained on all of ``src`` or on another source's subset. DataError when no row is kept."""
    ds = TokenShardDataset(src)
    rows = [i for i in range(len(ds)) if keep(str(ds.captions[i]))]
    if not rows:
        raise DataError(f"{src}: no caption among its {len(ds)} samples is kept by the filter ({what})")
    cfg = _read_json(os.path.join(src, CONFIG))
    cfg["sources"] = [f"{src} ({what})"]
    cfg["filtered_from"] = cfg["fingerprint"]
    cfg["fingerprint"] = _sha256_json({"filtered_from": cfg["filtered_from"], "filter": what})
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.makedirs(dst)
    atomic_write_text(os.path.join(dst, CONFIG), json.dumps(cfg, indent=1, sort_keys=True) + "\n")
    index = np.asarray(rows, dtype=np.int64)
    ids = np.asarray(ds.ids[index]).astype(cfg["dtype"]).reshape(len(rows), -1)
    write_part(dst, 0, cfg, ids, [str(k) for k in ds.keys[index]], [str(c) for c in ds.captions[index]], {})
    build_index(dst)
    return len(rows)


# ----------------------------------------------------------------------------------------------
# files of an output directory


def part_paths(out_dir: str, i: int) -> Dict[str, str]:
    base = os.path.join(out_dir, PART.format(i))
    return {"ids": base + ".npy", "captions": base + ".jsonl", "marker": base + ".json"}


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable ({e})") from None


def read_part(out_dir: str, i: int, fingerprint: Optional[str] = None) -> Optional[dict]:
    """The marker of part ``i`` if the part is complete (and of run ``fingerprint``), else None."""
    paths = part_paths(out_dir, i)
    try:
        marker = _read_json(paths["marker"])
    except DataError:
        return None
    if marker is None or (fingerprint is not None and marker.get("fingerprint") != fingerprint):
        return None
    if not (os.path.exists(paths["ids"]) and os.path.exists(paths["captions"])):
        return None
    return marker


def _write_npy(path: str, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)


def write_part(out_dir: str, i: int, config: dict, ids: np.ndarray, keys: List[str], captions: List[str],
               stats: Dict[str, int]) -> dict:
    """Write part ``i`` (ids, captions, then the marker; each atomically). Returns the marker."""
    paths = part_paths(out_dir, i)
    _write_npy(paths["ids"], ids)
    atomic_write_text(paths["captions"], "".join(
        json.dumps({"key": k, "caption": c}, ensure_ascii=False) + "\n" for k, c in zip(keys, captions)))
    counts = {k: int(stats.get(k, 0)) for k in PART_STATS}
    marker = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": config["fingerprint"], "part": i,
              "source": config["sources"][i], "ids": os.path.basename(paths["ids"]),
              "captions": os.path.basename(paths["captions"]), "count": int(ids.shape[0]),
              "skipped": counts["decode_errors"] + counts["incomplete"], **counts}
    atomic_write_text(paths["marker"], json.dumps(marker, indent=1, sort_keys=True) + "\n")
    return marker


def build_index(out_dir: str, required: bool = True) -> Optional[dict]:
    """Write ``index.json`` from ``config.json`` and the part markers and return it.

    When a part is missing: raise DataError if ``required``, else return None (other ranks are
    still running). The content depends only on the parts, so concurrent writers agree."""
    config = _read_json(os.path.join(out_dir, CONFIG))
    if config is None:
        raise DataError(f"{out_dir}: no {CONFIG}; this is not a token-shard directory (run qlip data tokenize)")
    parts, missing = [], []
    for i in range(len(config["sources"])):
        marker = read_part(out_dir, i, config["fingerprint"])
        if marker is None:
            missing.append(PART.format(i))
        else:
            parts.append({k: marker[k] for k in ("ids", "captions", "source", "count", "skipped") + PART_STATS})
    if missing:
        if required:
            raise DataError(f"{out_dir}: {len(missing)} of {len(config['sources'])} parts are missing or incomplete "
                            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); run the remaining "
                            "ranks (or the whole command again) first")
        return None
    index = {k: v for k, v in config.items()}
    index["shards"] = parts
    index["count"] = sum(p["count"] for p in parts)
    for k in ("skipped",) + PART_STATS:
        index[k] = sum(p[k] for p in parts)
    atomic_write_text(os.path.join(out_dir, INDEX), json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def read_index(out_dir: str) -> dict:
    """The manifest of a complete token-shard directory; DataError if there is none."""
    if not os.path.isdir(out_dir):
        raise DataError(f"{out_dir}: no such token-shard directory")
    index = _read_json(os.path.join(out_dir, INDEX))
    if index is None:
        raise DataError(f"{out_dir}: no {INDEX}: the tokenize run is incomplete (rerun it, or run it with "
                        "--merge-index once every rank has finished)")
    if index.get("format") != FORMAT or index.get("version") != FORMAT_VERSION:
        raise DataError(f"{out_dir}: {INDEX} is not a {FORMAT} v{FORMAT_VERSION} index")
    return index


def prepare_output(out_dir: str, config: dict, overwrite: bool = False) -> None:
    """Check that ``out_dir`` is empty of token shards or holds parts of this very run; with
    ``overwrite``, delete the parts of other runs. Then write ``config.json``.

    Only files of other runs are deleted, so concurrent ranks starting with ``--overwrite`` do not
    delete each other's new parts."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--out {out_dir} is a file, not a directory")
    os.makedirs(out_dir, exist_ok=True)
    old = _read_json(os.path.join(out_dir, CONFIG))
    stale = []  # (part number, marker or None) of other runs
    for name in sorted(os.listdir(out_dir)):
        m = _PART_RE.match(name)
        if m and name.endswith(".json") and not name.startswith("."):
            marker = _read_json(os.path.join(out_dir, name))
            if marker is None or marker.get("fingerprint") != config["fingerprint"]:
                stale.append(int(m.group(1)))
    if (old is not None and old.get("fingerprint") != config["fingerprint"]) or stale:
        if not overwrite:
            raise DataError(f"{out_dir} holds token shards of another run ({_difference(old, config)}); "
                            "pick another --out or pass --overwrite to replace them")
        for name in os.listdir(out_dir):  # temporaries are left to their part's owner
            m = _PART_RE.match(name)
            if name == INDEX or (m and not name.startswith(".")
                                 and (int(m.group(1)) in stale or int(m.group(1)) >= len(config["sources"]))):
                os.remove(os.path.join(out_dir, name))
    if old != config:
        atomic_write_text(os.path.join(out_dir, CONFIG), json.dumps(config, indent=1, sort_keys=True) + "\n")


def _difference(old: Optional[dict], new: dict) -> str:
    if old is None:
        return "parts without a config.json"
    what = []
    om, nm = old.get("model", {}), new["model"]
    if om.get("encoder_sha256") != nm["encoder_sha256"]:
        what.append(f"a model with other encoder weights or config: {om.get('name')!r} encoder "
                    f"{str(om.get('encoder_sha256'))[:12]}, yours {nm['name']!r} encoder {nm['encoder_sha256'][:12]}")
    if old.get("sources") != new["sources"]:
        what.append(f"{len(old.get('sources', []))} other source shards (now {len(new['sources'])})")
    if old.get("preprocess") != new["preprocess"]:
        what.append(f"preprocessing {old.get('preprocess')} (now {new['preprocess']})")
    return "; ".join(what) or f"format {old.get('format')} v{old.get('version')}"


# ----------------------------------------------------------------------------------------------
# tokenizing


class _PartReader(IterableDataset):
    """Decodes this rank's input shards into batches; each DataLoader worker reads whole shards.

    Yields messages {part, images (B,3,H,W) or None, keys, captions, done, stats}; the last message
    of a part has ``done=True`` and that part's counts. Batches never span two parts, so a part's
    batches (and hence its ids) do not depend on the number of workers or ranks."""

    def __init__(self, sources: Sequence[str], parts: Sequence[int], transform, batch_size: int):
        self.sources, self.parts, self.transform, self.batch_size = list(sources), list(parts), transform, batch_size
        self._warnings = 0

    def _warn(self, msg: str) -> None:
        self._warnings += 1
        if self._warnings <= MAX_WARNINGS:
            log.warning("qlip.data: %s", msg)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        mine = self.parts[info.id::info.num_workers] if info is not None else self.parts
        source = TarSource(self.sources)
        for i in mine:
            stats: collections.Counter = collections.Counter()
            items: list = []
            for raw in source.read(self.sources[i], stats, self._warn):
                item = self._decode(raw, stats)
                if item is not None:
                    items.append(item)
                if len(items) == self.batch_size:
                    yield self._message(i, items, False, stats)
                    items = []
            yield self._message(i, items, True, stats)

    def _decode(self, raw: dict, stats: collections.Counter) -> Optional[tuple]:
        where = f"{raw['key']} in {raw['url']}"
        if raw["missing"]:
            stats["incomplete"] += 1
            self._warn(f"skipping sample {where}: {raw['missing']}")
            return None
        try:
            x = self.transform(decode_image(raw["image"]))
        except Exception as e:  # noqa: BLE001 - image decoders raise many types; one bad file must not stop a run
            stats["decode_errors"] += 1
            self._warn(f"skipping sample {where}: undecodable image ({e.__class__.__name__}: {e})")
            return None
        return raw["key"], raw["text"], x

    @staticmethod
    def _message(i: int, items: list, done: bool, stats: collections.Counter) -> dict:
        keys, captions, images = zip(*items) if items else ((), (), ())
        return {"part": i, "images": torch.stack(images) if images else None, "keys": list(keys),
                "captions": list(captions), "done": done, "stats": dict(stats) if done else {}}


def rank_from_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK / WORLD_SIZE (0, 1 when unset)."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise DataError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} "
                        "are not integers") from None
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"RANK={rank} is not in a world of WORLD_SIZE={world}")
    return rank, world


def tokenize_shards(shards, model, out_dir: str, *, model_name: str = "", batch_size: int = 64, workers: int = 0,
                    rank: int = 0, world_size: int = 1, preprocess: str = "train", overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Tokenize this rank's parts of ``shards`` into ``out_dir`` (see the module docstring).

    Returns a summary: parts (this rank's), written, already_done, count and skipped (over the
    parts written now), stats, and index (the manifest if every part exists now, else None)."""
    if batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise DataError(f"--workers must be >= 0, got {workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is not in a world of size {world_size}")
    sources = expand_shards(shards)
    config = run_config(model, model_name, sources, preprocess)
    prepare_output(out_dir, config, overwrite)
    mine = [i for i in range(len(sources)) if i % world_size == rank]
    todo = [i for i in mine if read_part(out_dir, i, config["fingerprint"]) is None]
    _remove_temporaries(out_dir, set(todo))
    dtype = np.int32 if config["dtype"] == "int32" else np.int64
    delay = float(os.environ.get(DELAY_ENV, 0) or 0)
    summary = {"rank": rank, "world_size": world_size, "parts": mine, "written": [],
               "already_done": [i for i in mine if i not in todo], "count": 0,
               "stats": {k: 0 for k in PART_STATS}}
    if todo:
        reader = _PartReader(sources, todo, _transform(config["preprocess"]), batch_size)
        # workers decode the next batches while the model runs; pinned memory for a fast copy to a GPU
        messages = (DataLoader(reader, batch_size=None, num_workers=min(workers, len(todo)), prefetch_factor=4,
                               pin_memory=model.device.type == "cuda") if workers > 0 else reader)
        buffers: Dict[int, dict] = {}
        from tqdm import tqdm
        with tqdm(desc=f"tokenize rank {rank}/{world_size}" if world_size > 1 else "tokenize", unit="img",
                  disable=not progress or None) as bar, torch.inference_mode():
            for msg in messages:
                buf = buffers.setdefault(msg["part"], {"ids": [], "keys": [], "captions": []})
                if msg["images"] is not None:
                    ids = model.tokenize(msg["images"].to(model.device, model.dtype, non_blocking=True)).flatten(1)
                    buf["ids"].append(ids.cpu().numpy().astype(dtype))
                    buf["keys"] += msg["keys"]
                    buf["captions"] += msg["captions"]
                    bar.update(len(msg["keys"]))
                if not msg["done"]:
                    continue
                buf = buffers.pop(msg["part"])
                ids = (np.concatenate(buf["ids"]) if buf["ids"]
                       else np.zeros((0, model.grid * model.grid), dtype=dtype))
                marker = write_part(out_dir, msg["part"], config, ids, buf["keys"], buf["captions"], msg["stats"])
                summary["written"].append(msg["part"])
                summary["count"] += marker["count"]
                for k in PART_STATS:
                    summary["stats"][k] += marker[k]
                bar.set_postfix(parts=f"{len(summary['written'])}/{len(todo)}",
                                skipped=summary["stats"]["decode_errors"] + summary["stats"]["incomplete"])
                if delay:
                    time.sleep(delay)
    summary["written"].sort()
    summary["skipped"] = summary["stats"]["decode_errors"] + summary["stats"]["incomplete"]
    summary["index"] = build_index(out_dir, required=False)
    return summary


def _remove_temporaries(out_dir: str, parts: set) -> None:
    """Delete temporary files a killed run left for the parts this rank is about to redo (other
    ranks own other parts, so their in-flight temporaries are never touched)."""
    for name in os.listdir(out_dir):
        m = _PART_RE.match(name)
        if m and name.startswith(".") and name.endswith(".tmp") and int(m.group(1)) in parts:
            os.remove(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------------------------
# reading


class _Ids:
    """``dataset.ids[i]`` -> (h*w,) ids of sample i; ``dataset.ids[array]`` -> (n, h*w)."""

    def __init__(self, ds: "TokenShardDataset"):
        self._ds = ds

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index) -> np.ndarray:
        ds = self._ds
        if np.isscalar(index):
            s, j = ds.locate(int(index))
            return np.asarray(ds._ids(s)[j])
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        out = np.empty((len(index), ds.seq_len), dtype=ds.dtype)
        shard = ds._shard_of(index)
        for s in np.unique(shard):
            sel = np.nonzero(shard == s)[0]
            local = index[sel] - ds.offsets[s]
            order = np.argsort(local, kind="stable")  # sorted reads from the memory map
            out[sel[order]] = ds._ids(int(s))[local[order]]
        return out


class _Texts:
    """``dataset.captions[i]`` / ``dataset.keys[i]``: one string per sample."""

    def __init__(self, ds: "TokenShardDataset", field: str):
        self._ds, self._field = ds, field

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index) -> Union[str, List[str]]:
        if np.isscalar(index):
            s, j = self._ds.locate(int(index))
            return self._ds._texts(s)[self._field][j]
        return [self[int(i)] for i in np.asarray(index).reshape(-1)]


class TokenShardDataset:
    """Random access to a complete token-shard directory.

    ``len(ds)``; ``ds.ids[i]`` (np int32 ``(h*w,)``, or ``(n, h*w)`` for an index array);
    ``ds.captions[i]``, ``ds.keys[i]``; ``ds[i]`` -> {"ids": LongTensor (h*w,), "caption", "key"}.
    Ids are memory-mapped (nothing is read until used); a part's captions and keys are loaded on
    first access and kept. ``ds.index`` is the manifest (``grid``, ``bits``, ``skipped``, ...)."""

    def __init__(self, root: str):
        self.root = os.fspath(root)
        self.index = read_index(self.root)
        self.shards = self.index["shards"]
        counts = np.array([p["count"] for p in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.grid = tuple(self.index["grid"])
        self.seq_len = int(np.prod(self.grid))
        self.bits = self.index["bits"]
        self.dtype = np.dtype(self.index["dtype"])
        self.fingerprint = self.index["fingerprint"]
        self._memmaps: Dict[int, np.ndarray] = {}
        self._text: Dict[int, dict] = {}
        self.ids, self.captions, self.keys = _Ids(self), _Texts(self, "caption"), _Texts(self, "key")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> dict:
        return {"ids": torch.from_numpy(self.ids[i].astype(np.int64)), "caption": self.captions[i], "key": self.keys[i]}

    def locate(self, i: int) -> tuple[int, int]:
        """(part, row) of global sample ``i`` (negative indices count from the end)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        s = int(self._shard_of(np.array([i]))[0])
        return s, i - int(self.offsets[s])

    def _shard_of(self, index: np.ndarray) -> np.ndarray:
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"sample indices out of range for {len(self)} samples")
        return np.searchsorted(self.offsets, index, side="right") - 1

    def _ids(self, s: int) -> np.ndarray:
        if s not in self._memmaps:
            path = os.path.join(self.root, self.shards[s]["ids"])
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot map token ids ({e})") from None
            if arr.shape != (self.shards[s]["count"], self.seq_len):
                raise DataError(f"{path}: shape {arr.shape}, the index says {(self.shards[s]['count'], self.seq_len)}")
            self._memmaps[s] = arr
        return self._memmaps[s]

    def _texts(self, s: int) -> dict:
        if s not in self._text:
            path = os.path.join(self.root, self.shards[s]["captions"])
            try:
                with open(path, encoding="utf-8") as f:
                    rows = [json.loads(line) for line in f]
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: unreadable captions ({e})") from None
            if len(rows) != self.shards[s]["count"]:
                raise DataError(f"{path}: {len(rows)} captions, the index says {self.shards[s]['count']}")
            self._text[s] = {"caption": [r["caption"] for r in rows], "key": [r["key"] for r in rows]}
        return self._text[s]

    def batch(self, index: Sequence[int]) -> dict:
        """{"ids": LongTensor (n, h*w), "captions": [str], "keys": [str]} for global indices."""
        index = np.asarray(index, dtype=np.int64)
        return {"ids": torch.from_numpy(self.ids[index].astype(np.int64)),
                "captions": self.captions[index], "keys": self.keys[index]}


class TokenLoader:
    """Shuffled, rank-sliced, exactly resumable batches of a token-shard directory.

    Each epoch ``e`` orders the N samples by ``np.random.default_rng([seed, e]).permutation(N)``
    (``arange(N)`` without shuffle), identically on every rank; rank ``r`` takes positions
    ``r, r + W, ...`` and keeps ``N // W`` of them, so ranks are disjoint and all get the same
    number of samples (at most ``W - 1`` samples of an epoch are left out; with shuffling, a
    different few each epoch). Batches: {"ids": LongTensor (B, h*w), "captions": [str], "keys": [str]}.

    ``infinite=True``: one endless loop, a batch may span two epochs, nothing is dropped.
    ``infinite=False``: a ``for`` loop runs (the rest of) one epoch, the next loop the next epoch;
    the last short batch is dropped with ``drop_last``.

    ``state_dict()`` is (epoch, samples of this rank's epoch handed out, batches, stats);
    ``load_state_dict`` into a loader built with the same settings continues with exactly the
    batches the uninterrupted loader would have produced. ``stats``: ``samples`` handed out and
    ``skipped`` (always 0 here: corrupt samples were dropped at tokenization, counted in
    ``dataset.index["skipped"]``).
    """

    def __init__(self, root: Union[str, TokenShardDataset], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, infinite: bool = True, shuffle: bool = True, drop_last: bool = True):
        self.dataset = root if isinstance(root, TokenShardDataset) else TokenShardDataset(root)
        check_loader_args(batch_size, rank, world_size)
        if seed < 0:
            raise DataError(f"seed must be >= 0, got {seed}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.infinite, self.shuffle, self.drop_last = infinite, shuffle, drop_last
        self.samples_per_epoch = len(self.dataset) // world_size
        if self.samples_per_epoch == 0:
            raise DataError(f"{self.dataset.root}: {len(self.dataset)} samples cannot feed {world_size} ranks")
        self.epoch, self.position, self.batches = 0, 0, 0
        self.stats = {"samples": 0, "skipped": 0}
        self._order_cache: Optional[tuple[int, np.ndarray]] = None

    def __len__(self) -> int:
        """Batches per epoch (epoch mode)."""
        n, b = self.samples_per_epoch, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """Global sample indices of this rank's part of ``epoch``, in order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.dataset)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, perm[self.rank::self.world_size][:self.samples_per_epoch])
        return self._order_cache[1]

    def _epoch_finished(self) -> bool:
        rest = self.samples_per_epoch - self.position
        return rest == 0 or (self.drop_last and rest < self.batch_size)

    def _take(self, index: np.ndarray) -> dict:
        self.batches += 1
        self.stats["samples"] += len(index)
        return self.dataset.batch(index)

    def __iter__(self) -> Iterator[dict]:
        B, L = self.batch_size, self.samples_per_epoch
        if not self.infinite:
            if self._epoch_finished():
                self.epoch, self.position = self.epoch + 1, 0
            while not self._epoch_finished():
                index = self.order(self.epoch)[self.position:self.position + B]
                self.position += len(index)
                if self._epoch_finished():
                    self.position = L  # the dropped tail counts as consumed: the epoch is over
                yield self._take(index)
            return
        while True:
            parts = []
            need = B
            while need:
                if self.position == L:
                    self.epoch, self.position = self.epoch + 1, 0
                chunk = self.order(self.epoch)[self.position:self.position + need]
                parts.append(chunk)
                self.position += len(chunk)
                need -= len(chunk)
            yield self._take(np.concatenate(parts))

    # -- state ----------------------------------------------------------------------------------

    def _settings(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "infinite": self.infinite, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "num_samples": len(self.dataset), "fingerprint": self.dataset.fingerprint}

    def state_dict(self) -> dict:
        """Position after the last batch handed out; save it with the checkpoint."""
        return {"version": LOADER_STATE_VERSION, **self._settings(), "epoch": self.epoch, "position": self.position,
                "batches": self.batches, "stats": dict(self.stats)}

    def load_state_dict(self, state: Union[dict, Sequence[dict]]) -> None:
        """Restore a position (a dict from ``state_dict``, or the list of every rank's states)."""
        state = rank_state(state, self.rank, "token loader")
        check_loader_state(state, LOADER_STATE_VERSION, self._settings(), "token loader")
        self.epoch, self.position, self.batches = int(state["epoch"]), int(state["position"]), int(state["batches"])
        self.stats = copy.deepcopy(dict(state["stats"]))


# ----------------------------------------------------------------------------------------------
# command line (registered by qlip/data/cli.py)


def add_arguments(p) -> None:
    p.add_argument("shards", metavar="SHARDS", nargs="*",
                   help="input webdataset tar shards: paths, globs, brace patterns, folders (not needed "
                        "with --merge-index)")
    p.add_argument("--out", required=True, help="output directory of the token shards")
    p.add_argument("--model", "-m", help="preset name, local checkpoint folder or hub id")
    p.add_argument("--random-init", action="store_true", help="use random weights for a preset (no download)")
    p.add_argument("--seed", type=int, default=0, help="seed of random-init weights")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:1 ... (default: cuda:$LOCAL_RANK (modulo the GPU count) if CUDA "
                        "is available, else cpu)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="processes decoding images (0: in the main process); "
                   "each worker reads whole input shards, so more workers than shards do not help")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="fp32 (default); bf16: weights cast once, pre-sign projection in fp32 (>= 99%% of id "
                        "bits equal to fp32; its token shards get another encoder fingerprint); auto: bf16 on a "
                        "CUDA GPU or an AMX CPU, else fp32")
    p.add_argument("--preprocess", choices=("train", "model"), default="train",
                   help="train: image_transform(image_size, mean, std) as the trainer uses; "
                        "model: the model's own resize/crop (model.preprocess)")
    p.add_argument("--overwrite", action="store_true", help="replace token shards of another model or input")
    p.add_argument("--merge-index", action="store_true",
                   help="only (re)build index.json from the finished parts (no model needed)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def _load_model(args):
    from ..errors import QLIPError
    from ..io import load
    torch.manual_seed(args.seed)  # same random-init weights as the other commands
    try:
        model = load(args.model, pretrained=False if args.random_init else None, device=_device(args.device),
                     precision=getattr(args, "precision", None))
    except QLIPError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        from ..errors import CheckpointError
        raise CheckpointError(f"cannot load model {args.model!r}: {e.__class__.__name__}: {e}") from None
    return model.eval()


def run_cli(args, print_fn: Callable[[str], None] = print) -> int:
    """``qlip data tokenize``; see the module docstring."""
    if args.merge_index:
        index = build_index(args.out, required=True)
        print_fn(_index_line(args.out, index))
        return 0
    if not args.shards:
        raise DataError("no input shards given (SHARDS)")
    if not args.model:
        raise DataError("--model is required (unless --merge-index)")
    sources = expand_shards(args.shards)  # fail on bad input before loading a model
    rank, world = rank_from_env()
    model = _load_model(args)
    if getattr(args, "precision", "fp32") != "fp32" and not args.quiet:
        print_fn(f"precision {model.precision_choice}")
    s = tokenize_shards(sources, model, args.out, model_name=args.model, batch_size=args.batch_size,
                        workers=args.workers, rank=rank, world_size=world, preprocess=args.preprocess,
                        overwrite=args.overwrite, progress=not args.quiet)
    who = f"rank {rank}/{world}: " if world > 1 else ""
    st = s["stats"]
    print_fn(f"{who}{args.out}: wrote {len(s['written'])} parts ({s['count']} samples, {s['skipped']} skipped: "
             f"{st['decode_errors']} undecodable, {st['incomplete']} incomplete; {st['shard_errors']} shard errors), "
             f"{len(s['already_done'])} already done; parts {_part_list(s['written'])}")
    if s["index"] is not None:
        print_fn(_index_line(args.out, s["index"]))
    else:
        print_fn(f"{args.out}: other ranks' parts are still missing; the last rank to finish writes {INDEX} "
                 "(or run again with --merge-index)")
    return 0


def _index_line(out: str, index: dict) -> str:
    return (f"{out}/{INDEX}: {index['count']} samples in {len(index['shards'])} parts, {index['skipped']} skipped "
            f"({index['decode_errors']} undecodable, {index['incomplete']} incomplete), "
            f"{index['grid'][0]}x{index['grid'][1]} tokens of {index['bits']} bits ({index['dtype']})")


def _part_list(parts: Sequence[int]) -> str:
    return ",".join(str(i) for i in parts) if parts else "none"
