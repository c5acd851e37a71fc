"""The ``t2i`` training task: a :class:`qlip.gen.model.T2IModel` on token shards, through the engine.

    task: t2i
    model: {preset: gpt-demo}                 # or gpt-b / gpt-l / gpt-xl / gpt-tiny, + size overrides
    head: {kind: split}                       # split | bitwise | intra (qlip.gen.heads)
    text: {encoder: qlip, model: runs/demo/stage1/final, max_len: 16, dropout: 0.1}
    data: {train: data/shapes-tokens, batch_size: 64, tokenizer: runs/demo/stage2/final}
    optim: {optimizer: adamw, lr: 1e-3, betas: [0.9, 0.95], weight_decay: 0.05, warmup_steps: 50, steps: 600}

Data: the id shards of ``qlip data tokenize`` (``qlip.data.TokenLoader``: shuffled, rank-disjoint,
exactly resumable); the grid and bits come from their index. Captions are encoded on the fly by
the frozen text encoder (``qlip.gen.text``, in-memory cache). Caption dropout is a pure function
of ``(train.seed, step, sample key)``, so it is the same after a resume and for any number of ranks.

Saved model (``OUT/final``, checkpoints): ``config.json`` (``architecture: qlip-gen-t2i``, the
:class:`GenConfig`, the text encoder spec, the QLIP tokenizer spec used to decode ids) +
``model.safetensors``; :func:`qlip.gen.load` reads it.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..train.recipe import DataSection, check
from ..train.task import StepLog, Task
from .heads import HEAD_KINDS
from .model import PRESETS, PREFIX_ROPE, GenConfig, T2IModel
from .text import ENCODERS, TextFeatures, build_text_encoder, check_pooled

ARCHITECTURE = "qlip-gen-t2i"


@dataclass
class GenModelSection:
    """A preset (``qlip.gen.model.PRESETS``) and overrides of its sizes."""
    preset: str = "gpt-demo"
    dim: Optional[int] = None
    n_layers: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    ffn_hidden: Optional[int] = None
    qk_norm: bool = False
    prefix_rope: str = "none"       # none (identity rotation of the caption) | zero (LlamaGen's)
    grad_checkpointing: bool = False

    def validate(self) -> None:
        check("model.preset", self.preset, f"one of {', '.join(PRESETS)}", self.preset in PRESETS)
        check("model.prefix_rope", self.prefix_rope, f"one of {', '.join(PREFIX_ROPE)}", self.prefix_rope in PREFIX_ROPE)

    def sizes(self) -> Dict[str, Any]:
        out = dict(PRESETS[self.preset])
        for k in ("dim", "n_layers", "n_heads", "ffn_hidden"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return {**out, "n_kv_heads": self.n_kv_heads, "qk_norm": self.qk_norm, "prefix_rope": self.prefix_rope}


@dataclass
class HeadSection:
    kind: str = "split"             # split | bitwise | intra
    groups: int = 2                 # sub-tokens per id (split, intra)

    def validate(self) -> None:
        check("head.kind", self.kind, f"one of {', '.join(HEAD_KINDS)}", self.kind in HEAD_KINDS)
        check("head.groups", self.groups, ">= 1", self.groups >= 1)
        if self.kind == "intra":
            check("head.groups", self.groups, ">= 2 with head.kind=intra", self.groups >= 2)


@dataclass
class TextSection:
    encoder: str = "qlip"           # qlip (its text tower) | t5 (transformers) | embedding (learned, no encoder)
    model: Optional[str] = None     # QLIP checkpoint / preset, or a T5 name / folder (default google/flan-t5-xl)
    random_init: bool = False       # QLIP preset with random weights (tests)
    seed: int = 0                   # seed of random weights
    max_len: int = 16               # caption tokens = prefix length
    dropout: float = 0.1            # caption dropout to the null condition (for CFG)
    cache_size: int = 4096          # captions whose features stay in memory (0: none)
    pooled: bool = False            # qlip: append the aligned caption embedding to every token's features
    t5_config: Optional[Dict[str, Any]] = None   # a random T5 encoder of this T5Config (tests, offline)

    def validate(self) -> None:
        check("text.encoder", self.encoder, f"one of {', '.join(ENCODERS)}", self.encoder in ENCODERS)
        check("text.max_len", self.max_len, ">= 1", self.max_len >= 1)
        check("text.dropout", self.dropout, "in [0, 1)", 0 <= self.dropout < 1)
        check("text.cache_size", self.cache_size, ">= 0", self.cache_size >= 0)
        if self.t5_config is not None and (self.encoder != "t5" or not isinstance(self.t5_config, dict)):
            raise ConfigError(f"text.t5_config must be a mapping of T5Config fields, with text.encoder=t5, "
                              f"got {self.t5_config!r}")
        check_pooled(self.encoder, self.pooled)

    def spec(self) -> Dict[str, Any]:
        model = self.model
        if model and os.path.isdir(model):
            model = os.path.abspath(model)
        return {"encoder": self.encoder, "model": model, "random_init": self.random_init, "seed": self.seed,
                "max_len": self.max_len, "t5_config": self.t5_config,
                **({"pooled": True} if self.pooled else {})}  # absent when off: earlier runs keep their identity


@dataclass
class GenDataSection(DataSection):
    tokenizer: Optional[str] = None         # QLIP that made the shards (to decode samples); default: text.model
    tokenizer_random_init: bool = False     # (qlip encoder) or the shards' model name
    tokenizer_seed: int = 0


def caption_dropout(keys: List[str], step: int, seed: int, p: float) -> torch.Tensor:
    """``(B,)`` bool: which captions become the null condition; a hash of (seed, step, key)."""
    u = [zlib.crc32(f"{seed}/{step}/{k}".encode("utf-8")) / 2 ** 32 for k in keys]
    return torch.tensor(u) < p


class T2ITask(Task):
    name = "t2i"
    sections = {"model": GenModelSection, "head": HeadSection, "text": TextSection, "data": GenDataSection}
    loss_weights = {"nll": 1.0}

    @classmethod
    def validate_recipe(cls, recipe) -> None:
        if recipe.text.encoder == "qlip" and not recipe.text.model:
            raise ConfigError("text.model must name the QLIP whose text tower encodes the captions")

    def _dataset(self):
        from ..data.tokens import TokenShardDataset
        if not self.r.data.train or not isinstance(self.r.data.train, str):
            raise ConfigError("data.train must be a token-shard folder written by `qlip data tokenize`")
        if not hasattr(self, "_ds"):
            self._ds = TokenShardDataset(self.r.data.train)
        return self._ds

    def tokenizer_spec(self) -> Dict[str, Any]:
        d, t = self.r.data, self.r.text
        if d.tokenizer:
            name = os.path.abspath(d.tokenizer) if os.path.isdir(d.tokenizer) else d.tokenizer
            return {"model": name, "random_init": d.tokenizer_random_init, "seed": d.tokenizer_seed}
        if t.encoder == "qlip":
            return {"model": t.spec()["model"], "random_init": t.random_init, "seed": t.seed}
        return {"model": self._dataset().index["model"]["name"], "random_init": False, "seed": 0}

    def build_model(self) -> T2IModel:
        ds = self._dataset()
        self.text = TextFeatures(build_text_encoder(self.r.text.spec(), self.device), self.r.text.cache_size)
        gh, gw = ds.grid
        cfg = GenConfig(**self.r.model.sizes(), bits=int(ds.index["bits"]), grid_h=gh, grid_w=gw,
                        head=self.r.head.kind, groups=self.r.head.groups, text_dim=self.text.dim,
                        text_len=self.r.text.max_len, text_vocab=self.text.vocab_size)
        model = T2IModel(cfg)
        model.backbone.grad_checkpointing = self.r.model.grad_checkpointing
        self.model = model
        return model

    def build_loader(self):
        from ..data.tokens import TokenLoader
        return TokenLoader(self._dataset(), self.r.data.batch_size, seed=self.r.train.seed, rank=self.dist.rank,
                           world_size=self.dist.world_size, infinite=True, shuffle=True)

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        from ..train.optim import param_groups
        return param_groups(model, lambda name: ("gen", self.r.optim.lr), self.r.optim.weight_decay)

    def fsdp_units(self, model: T2IModel) -> List[nn.Module]:
        return model.fsdp_units()

    def micro_step(self, batch: Dict[str, Any], scale: float, log: StepLog, step: int) -> torch.Tensor:
        ids = batch["ids"].to(self.device, non_blocking=True)
        feats = self.text(batch["captions"], self.device)
        drop = caption_dropout(batch["keys"], step, self.r.train.seed, self.r.text.dropout).to(self.device)
        with self.autocast():
            nll = self.model(feats, ids, drop)
        terms = {"nll": nll.float()}
        log.add(terms, scale)
        return self.total(terms)

    def save_model(self, model: T2IModel, folder: str, state_dict=None) -> None:
        from ..io import atomic_write_text, write_safetensors
        os.makedirs(folder, exist_ok=True)
        sd = state_dict if state_dict is not None else model.state_dict()
        write_safetensors(sd, os.path.join(folder, "model.safetensors"))
        meta = {"architecture": ARCHITECTURE, "config": model.cfg.to_dict(), "text": self.r.text.spec(),
                "tokenizer": self.tokenizer_spec(), "caption_dropout": self.r.text.dropout}
        atomic_write_text(os.path.join(folder, "config.json"), json.dumps(meta, indent=2) + "\n")
