"""A causal language model on bytes: the engine's second task.

It trains :class:`qlip.nn.CausalTransformer` (RMSNorm, RoPE, grouped-query attention, optional
QK-norm, SwiGLU) with next-byte cross-entropy on a text corpus
(:mod:`qlip.data.text_corpus`). It exists to keep the engine honest: nothing in the engine may
know QLIP, and this task proves it (exact resume and multi-rank equivalence are tested on it as
on QLIP). It is also a small, complete example of writing a task::

    task: causal_lm
    model: {dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_hidden: 128, qk_norm: true}
    data: {train: corpus.txt, batch_size: 8, seq_len: 64}
    optim: {optimizer: adamw, lr: 3e-3, warmup_steps: 10, steps: 200}

The trained model is saved as ``config.json`` (``{"architecture": "causal_lm", "config": ...}``)
+ ``model.safetensors``; :func:`load_causal_lm` reads it back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import CheckpointError, ConfigError
from ...nn import CausalLMConfig, CausalTransformer
from ..recipe import DataSection, check
from ..task import StepLog, Task

ARCHITECTURE = "causal_lm"


@dataclass
class LMModelSection:
    """The :class:`qlip.nn.CausalLMConfig` fields (vocabulary: the 256 byte values)."""
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    ffn_hidden: int = 344
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = False
    grad_checkpointing: bool = False

    def config(self, max_seq_len: int) -> CausalLMConfig:
        from ...data.text_corpus import VOCAB_SIZE
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "grad_checkpointing"}
        try:
            return CausalLMConfig(vocab_size=VOCAB_SIZE, max_seq_len=max_seq_len, **kw)
        except (ConfigError, ValueError) as e:
            raise ConfigError(f"model: {e}") from None


@dataclass
class LMDataSection(DataSection):
    seq_len: int = 128          # bytes per training window (the model sees seq_len, predicts seq_len)
    val_fraction: float = 0.1   # the corpus' last fraction, held out for the evaluation hook
    eval_batches: int = 8       # batches of the held-out part per evaluation

    def validate(self) -> None:
        super().validate()
        check("data.seq_len", self.seq_len, ">= 1", self.seq_len >= 1)
        check("data.val_fraction", self.val_fraction, "in (0, 1)", 0 < self.val_fraction < 1)
        check("data.eval_batches", self.eval_batches, ">= 1", self.eval_batches >= 1)


class CausalLMTask(Task):
    name = "causal_lm"
    sections = {"model": LMModelSection, "data": LMDataSection}
    loss_weights = {"ce": 1.0}

    @classmethod
    def validate_recipe(cls, recipe) -> None:
        recipe.model.config(recipe.data.seq_len).validate()

    def build_model(self) -> CausalTransformer:
        cfg = self.r.model.config(self.r.data.seq_len)
        model = CausalTransformer(cfg)
        model.grad_checkpointing = self.r.model.grad_checkpointing
        self.model = model
        return model

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        from ..optim import param_groups
        # norms, biases: no decay (qlip.train.optim); embeddings and matrices: decay
        return param_groups(model, lambda name: ("lm", self.r.optim.lr), self.r.optim.weight_decay)

    def fsdp_units(self, model: CausalTransformer) -> List[nn.Module]:
        return [m for _, m in model.fsdp_units()]

    def _loader(self, split: str):
        from ...data.text_corpus import ByteCorpusLoader
        d = self.r.data
        if not d.train:
            raise ConfigError("data.train is empty: give a text file (or files / a glob) to train on")
        return ByteCorpusLoader(d.train, d.batch_size, d.seq_len, seed=self.r.train.seed if split == "train" else 1,
                                rank=self.dist.rank, world_size=self.dist.world_size,
                                val_fraction=d.val_fraction, split=split)

    def build_loader(self):
        return self._loader("train")

    def micro_step(self, batch: Dict[str, Any], scale: float, log: StepLog, step: int) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        with self.autocast():
            logits = self.model(tokens[:, :-1])
        ce = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
        terms = {"ce": ce}
        log.add(terms, scale)
        return self.total(terms)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> Dict[str, float]:
        """Held-out cross-entropy (nats per byte), bits per byte and perplexity, averaged over
        ``data.eval_batches`` batches (the same batches at every evaluation) and over ranks."""
        from ..distributed import mean_scalars
        val = self._loader("val")
        total = 0.0
        for i in range(self.r.data.eval_batches):
            tokens = val.batch(i)["tokens"].to(self.device)
            with self.autocast():
                logits = model(tokens[:, :-1])
            total += float(F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()))
        ce = mean_scalars({"ce": total / self.r.data.eval_batches}, self.dist)["ce"]
        return {"val_ce": ce, "val_bpb": ce / math.log(2), "val_ppl": math.exp(min(ce, 50.0))}

    def save_model(self, model: CausalTransformer, folder: str, state_dict=None) -> None:
        from ...io import atomic_write_text, write_safetensors
        os.makedirs(folder, exist_ok=True)
        sd = state_dict if state_dict is not None else model.state_dict()
        if model.cfg.tie_embeddings:  # safetensors refuses two names for one storage: store a copy
            sd = {k: (v.clone() if k == "output.weight" else v) for k, v in sd.items()}
        write_safetensors(sd, os.path.join(folder, "model.safetensors"))
        cfg = dataclasses.asdict(model.cfg)
        atomic_write_text(os.path.join(folder, "config.json"),
                          json.dumps({"architecture": ARCHITECTURE, "config": cfg}, indent=2) + "\n")


def load_causal_lm(folder: str) -> CausalTransformer:
    """A model saved by the ``causal_lm`` task (``OUT/final`` or a checkpoint folder)."""
    from ...io import load_state_dict_strict, read_json, read_state_dict
    meta = read_json(os.path.join(folder, "config.json"))
    if meta.get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"{folder}: not a causal_lm model (architecture {meta.get('architecture')!r})")
    model = CausalTransformer(CausalLMConfig.from_dict(meta["config"]))
    sd = read_state_dict(folder)
    load_state_dict_strict(model, sd, folder)
    return model.eval()
