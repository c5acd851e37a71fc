"""A trained generator with its text encoder and its QLIP tokenizer: ``qlip.gen.load(dir)``.

    gen = qlip.gen.load("runs/demo-t2i/qlip")
    ids = gen.generate(["a red circle"], n=8, cfg=4.0, top_k=None, seed=0)   # (8, h, w) int64
    images = gen.decode(ids)                                                   # (8, 3, H, W) in [0, 1]

The text encoder and the tokenizer are loaded on first use from the specs in ``config.json``
(``text``, ``tokenizer``), so sampling ids does not need the tokenizer and decoding does not need
the text encoder.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from ..errors import CheckpointError, QLIPError
from .heads import upgrade_state_dict
from .model import GenConfig, T2IModel
from .text import TextFeatures, build_text_encoder, load_qlip


class Generator:
    def __init__(self, model: T2IModel, meta: Dict[str, Any], folder: Optional[str] = None,
                 device: Union[str, torch.device] = "cpu"):
        self.model, self.meta, self.folder, self.device = model.eval(), meta, folder, torch.device(device)
        self._text: Optional[TextFeatures] = None
        self._tokenizer = None

    @property
    def text(self) -> TextFeatures:
        if self._text is None:
            self._text = TextFeatures(build_text_encoder(self.meta["text"], self.device))
        return self._text

    @property
    def tokenizer(self):
        """The QLIP that decodes the generated ids."""
        if self._tokenizer is None:
            t = self.meta.get("tokenizer") or {}
            if not t.get("model"):
                raise QLIPError(f"{self.folder}: config.json names no QLIP tokenizer to decode the ids with")
            self._tokenizer = load_qlip(t["model"], t.get("random_init", False), t.get("seed", 0), self.device)
        return self._tokenizer

    @torch.no_grad()
    def generate(self, prompts: Union[str, Sequence[str]], n: int = 1, cfg: float = 4.0, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0, cfg_interval: int = -1,
                 batch_size: int = 64, use_cache: bool = True) -> torch.Tensor:
        """``n`` samples per prompt, prompt-major: ``(len(prompts) * n, grid_h, grid_w)`` int64 ids.
        The same arguments (``batch_size`` included) give the same ids."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if n < 1 or batch_size < 1:
            raise QLIPError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
        captions: List[str] = [p for p in prompts for _ in range(n)]
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        for i in range(0, len(captions), batch_size):
            feats = self.text(captions[i:i + batch_size], self.device)
            out.append(self.model.generate(feats, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p,
                                           generator=g, cfg_interval=cfg_interval, use_cache=use_cache))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids ``(B, h, w)`` -> images ``(B, 3, H, W)`` float32 in [0, 1]."""
        from ..model.preprocess import denormalize
        tok = self.tokenizer
        return denormalize(tok.detokenize(ids.to(tok.device)).float(), tok.image_mean, tok.image_std).clamp(0, 1)


def load(folder: str, device: Union[str, torch.device] = "cpu") -> Generator:
    """A generator saved by the ``t2i`` task (``OUT/final`` or a checkpoint folder)."""
    from ..io import load_state_dict_strict, read_json, read_state_dict
    meta = read_json(os.path.join(folder, "config.json"))
    if meta.get("architecture") != "qlip-gen-t2i":
        raise CheckpointError(f"{folder}: not a qlip.gen text-to-image model (architecture {meta.get('architecture')!r})")
    model = T2IModel(GenConfig.from_dict(meta["config"]))
    load_state_dict_strict(model, upgrade_state_dict(read_state_dict(folder)), folder)
    return Generator(model.to(device), meta, folder, device)
