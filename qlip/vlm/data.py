"""VLM training data: LLaVA's JSON format, encoded into padded batches; a resumable loader.

LLaVA's format is a JSON list (or JSON lines) of records::

    {"id": "0001", "image": "relative/path.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat color is the shape?"},
                       {"from": "gpt", "value": "red"}, ...]}

``image`` is relative to the image folder (``data.image_folder``; default: the JSON's folder)
and may be absent (a text-only conversation). A record with an image but no ``<image>`` in its
text gets ``<image>\\n`` prepended to its first user turn, as LLaVA does.

Batches (:class:`VLMProcessor.collate`): ``input_ids`` and ``labels`` (B, T) padded to the
longest sample (right padding for training, left for generation; labels ``-100`` on padding),
``attention_mask`` (B, T), ``pixel_values`` (n_images, 3, H, W) in sample order.

:class:`VLMLoader`: global batch ``i`` is a pure function of ``(seed, i)``: the records in a
seeded permutation per epoch, ``batch_size x world_size`` rows per global batch, rank ``r``
keeping rows ``r*b .. (r+1)*b``; so resume needs only ``i``, and N ranks equal one process.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..data.loader_state import IndexedLoader
from ..errors import DataError
from .conversation import IGNORE_INDEX, from_llava, tokenize_conversation



def read_llava_json(paths: Union[str, Sequence[str]]) -> List[Dict[str, Any]]:
    """Records of one or more LLaVA JSON (list) or JSON-lines files; each record gets ``_root``
    (its file's folder) for relative image paths."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise DataError("no LLaVA JSON file given")
    out: List[Dict[str, Any]] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None
        try:
            if text.lstrip().startswith("["):
                recs = json.loads(text)
            else:  # JSON lines
                recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as e:
            raise DataError(f"{path}: not LLaVA JSON ({e})") from None
        for i, r in enumerate(recs):
            if not isinstance(r, dict) or not isinstance(r.get("conversations"), list) or not r["conversations"]:
                raise DataError(f"{path}: record {i} has no 'conversations' list")
            out.append({**r, "_root": os.path.dirname(os.path.abspath(path))})
    return out


class VLMProcessor:
    """Text and images of one sample -> model inputs, for a given VLM (its tokenizer, image
    token, number of image tokens, template, max length and QLIP's preprocessing)."""

    def __init__(self, model, image_folder: Optional[str] = None):
        self.tokenizer = model.tokenizer
        self.image_token_id, self.num_image_tokens = model.image_token_id, model.num_image_tokens
        self.image_token = model.config.image_token
        self.max_length, self.template = model.config.max_length, model.config.template
        self.pad_token_id = model.pad_token_id
        self.pp = model.vision.qlip.config.preprocess
        self.image_folder = image_folder

    def image(self, img) -> torch.Tensor:
        """A PIL image or a path -> normalised (3, H, W)."""
        from ..model.preprocess import normalize, open_image, pil_to_tensor, resize_center_crop, to_rgb
        im = to_rgb(img) if hasattr(img, "mode") else open_image(img)
        x = pil_to_tensor(resize_center_crop(im, self.pp.resize, self.pp.crop, self.pp.interpolation))
        return normalize(x[None], self.pp.mean, self.pp.std)[0]

    def with_image_token(self, messages: List[Dict[str, str]]) -> List[Dict[str, str]]:
        """LLaVA's rule: an image whose text has no placeholder goes before the first user turn."""
        if any(self.image_token in m["content"] for m in messages):
            return messages
        out = [dict(m) for m in messages]
        first = next((m for m in out if m["role"] == "user"), None)
        if first is None:
            raise DataError("a conversation with an image has no user turn")
        first["content"] = f"{self.image_token}\n{first['content']}"
        return out

    def encode(self, messages: List[Dict[str, str]], image=None, train: bool = True) -> Dict[str, Any]:
        """``{"input_ids", "labels", "pixel_values" (1, 3, H, W) or None}`` of one conversation;
        ``train=False``: a generation prompt (no labels, the assistant prefix appended)."""
        if image is not None:
            messages = self.with_image_token(messages)
        n_placeholders = sum(m["content"].count(self.image_token) for m in messages)
        if n_placeholders != (1 if image is not None else 0):
            raise DataError(f"a conversation has {n_placeholders} {self.image_token} placeholders for "
                            f"{1 if image is not None else 0} image(s)")
        ids, labels = tokenize_conversation(self.tokenizer, messages, self.image_token_id, self.num_image_tokens,
                                            self.max_length, self.template, train=train,
                                            add_generation_prompt=not train)
        if train and all(y == IGNORE_INDEX for y in labels):
            raise DataError("a training conversation has no assistant answer within max_length")
        pix = self.image(image)[None] if image is not None else None
        return {"input_ids": ids, "labels": labels, "pixel_values": pix}

    def image_path(self, rec: Dict[str, Any]) -> Optional[str]:
        """The image file of a LLaVA record (relative to ``image_folder``, default the JSON's
        folder), or None for a text-only record."""
        if not rec.get("image"):
            return None
        return os.path.join(self.image_folder or rec.get("_root", ""), rec["image"])

    def encode_record(self, rec: Dict[str, Any]) -> Dict[str, Any]:
        return self.encode(from_llava(rec["conversations"]), self.image_path(rec))

    def token_length(self, rec: Dict[str, Any]) -> int:
        """Tokens of a record's whole conversation (image tokens included), before any cut at
        ``max_length``; no image is read."""
        messages = from_llava(rec["conversations"])
        if self.image_path(rec) is not None:
            messages = self.with_image_token(messages)
        ids, _ = tokenize_conversation(self.tokenizer, messages, self.image_token_id, self.num_image_tokens,
                                       1 << 30, self.template)
        return len(ids)

    def collate(self, samples: Sequence[Dict[str, Any]], padding_side: str = "right") -> Dict[str, torch.Tensor]:
        T = max(len(s["input_ids"]) for s in samples)
        ids = torch.full((len(samples), T), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(samples), T), dtype=torch.long)
        for i, s in enumerate(samples):
            n = len(s["input_ids"])
            sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
            ids[i, sl] = torch.tensor(s["input_ids"])
            labels[i, sl] = torch.tensor(s["labels"])
            mask[i, sl] = 1
        pix = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        out["pixel_values"] = torch.cat(pix) if pix else torch.zeros(0)
        return out


def count_cut(records: Sequence[Dict[str, Any]], processor: VLMProcessor, limit: int = 1000) -> Tuple[int, int]:
    """``(cut, scanned)``: how many of the first ``limit`` records are longer than the processor's
    ``max_length`` (training keeps only their first ``max_length`` tokens: the answers after the
    cut are never trained)."""
    scanned = list(records[:limit])
    return sum(processor.token_length(r) > processor.max_length for r in scanned), len(scanned)


class VLMLoader(IndexedLoader):
    """Infinite, resumable stream of this rank's batches of LLaVA records (module docstring)."""

    what = "VLM loader"

    def __init__(self, records: List[Dict[str, Any]], processor: VLMProcessor, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not records:
            raise DataError("no training records")
        self.records, self.processor = records, processor
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        super().__init__()
        self._perm: Dict[int, List[int]] = {}

    def _order(self, epoch: int) -> List[int]:
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = {epoch: torch.randperm(len(self.records), generator=g).tolist()}
        return self._perm[epoch]

    def batch(self, index: int) -> Dict[str, torch.Tensor]:
        """Batch ``index`` of this rank (a pure function of seed, index and rank)."""
        G, n = self.batch_size * self.world_size, len(self.records)
        start = index * G + self.rank * self.batch_size
        rows = []
        for p in range(start, start + self.batch_size):
            rows.append(self.records[self._order(p // n)[p % n]])
        return self.processor.collate([self.processor.encode_record(r) for r in rows])


    def _settings(self) -> Dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_records": len(self.records)}

