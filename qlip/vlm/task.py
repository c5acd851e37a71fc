"""LLaVA-1.5's two training stages as a task of the training engine (``task: vlm``).

Stage 1 (feature alignment) trains only the projector (LLaVA-1.5: lr 1e-3); stage 2 (visual
instruction tuning) trains the projector and the language model (lr 2e-5, usually starting from
stage 1's ``OUT/final`` with ``model.init``). The QLIP vision tower is frozen in both. The loss is
next-token cross-entropy on the assistant answers (:func:`qlip.vlm.model.answer_loss`)::

    task: vlm
    model: {qlip: runs/demo/qlip, llm: path/or/hub-id, layer: -2, projector: mlp2x_gelu}
    data: {train: data/shapes-qa/train.json, batch_size: 16}
    optim: {optimizer: adamw, lr: 1e-3, warmup_steps: 20, steps: 500, weight_decay: 0.0}
    train: {stage: 1}

The engine brings exact resume, DDP / FSDP2 (stage 2: every decoder layer of the LLM is a unit),
bf16 autocast and the rest; the trained model is saved with :meth:`qlip.vlm.model.VLM.save_pretrained`
(``qlip.vlm.load("OUT/final")``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..train.recipe import DataSection, TrainSection, check
from ..train.task import StepLog, Task
from .model import VLM, VLMConfig, answer_loss, build_vlm, enable_checkpointing, load, read_weights

log = logging.getLogger("qlip.vlm")


@dataclass
class VLMModelSection:
    qlip: Optional[str] = None       # QLIP folder, preset or hub id (the frozen vision tower)
    llm: Optional[str] = None        # causal LM folder or hub id (AutoModelForCausalLM)
    init: Optional[str] = None       # a saved VLM to start from (stage 2: stage 1's OUT/final)
    layer: int = -2                  # encoder block read (python indexing)
    features: str = "hidden"         # hidden | codes (after the quantizer)
    projector: str = "mlp2x_gelu"    # mlp2x_gelu | linear
    image_token: str = "<image>"
    max_length: int = 512
    template: str = "auto"           # auto | plain
    grad_checkpointing: bool = False  # the LLM's activation checkpointing (transformers')
    feature_norm: str = "none"       # none | layernorm | standardize (qlip.vlm.feature_norm)
    feature_norm_images: int = 256   # standardize: training images its statistics are measured on
    token_merge: int = 1             # k x k patch tokens -> one LLM position (qlip.vlm.projector)

    def config(self) -> VLMConfig:
        return VLMConfig(layer=self.layer, features=self.features, projector=self.projector,
                         image_token=self.image_token, max_length=self.max_length, template=self.template,
                         feature_norm=self.feature_norm, token_merge=self.token_merge)

    def validate(self) -> None:
        if self.init is None and not (self.qlip and self.llm):
            raise ConfigError("model.qlip and model.llm are required (or model.init: a saved VLM)")
        if self.init is not None and (self.qlip or self.llm):
            raise ConfigError("model.init is a whole VLM: leave model.qlip and model.llm empty")
        if self.feature_norm_images < 2:
            raise ConfigError(f"model.feature_norm_images must be >= 2, got {self.feature_norm_images}")
        self.config().validate()


@dataclass
class VLMDataSection(DataSection):
    image_folder: Optional[str] = None   # root of the records' image paths (default: each JSON's folder)


@dataclass
class VLMTrainSection(TrainSection):
    stage: int = 1                       # 1: projector only; 2: projector + LLM
    projector_lr: Optional[float] = None  # the projector's lr (default optim.lr, as the LLM's)

    def validate(self) -> None:
        super().validate()
        check("train.stage", self.stage, "1 or 2", self.stage in (1, 2))
        if self.projector_lr is not None:
            check("train.projector_lr", self.projector_lr, "> 0", self.projector_lr > 0)


class VLMTask(Task):
    name = "vlm"
    sections = {"model": VLMModelSection, "data": VLMDataSection, "train": VLMTrainSection}
    loss_weights = {"ce": 1.0}

    @classmethod
    def validate_recipe(cls, recipe) -> None:
        if not recipe.data.train:
            raise ConfigError("data.train is empty: give a LLaVA JSON file (or a list of them)")

    def build_model(self) -> VLM:
        m = self.r.model
        if m.init is not None:
            model = load(m.init)
            if model.config != m.config():
                raise ConfigError(f"model.init {m.init!r} was built with {model.config}; the recipe's model "
                                  f"keys (layer, features, projector, ...) must match it")
        else:
            model = build_vlm(m.qlip, m.llm, m.config())
            self._fit_feature_norm(model)
        model.llm.requires_grad_(self.r.train.stage == 2)
        if m.grad_checkpointing:
            enable_checkpointing(model.llm)
        self.model = model
        return model

    def _fit_feature_norm(self, model: VLM) -> None:
        """A fresh model's ``standardize`` statistics, from the first ``model.feature_norm_images``
        distinct training images (in file order: every rank measures the same)."""
        if model.config.feature_norm != "standardize":
            return
        from .data import VLMProcessor, read_llava_json
        proc = VLMProcessor(model, self.r.data.image_folder)
        paths: Dict[str, None] = {}  # insertion-ordered set: file order, each image once
        for rec in read_llava_json(self.r.data.train):
            if len(paths) == self.r.model.feature_norm_images:
                break
            path = proc.image_path(rec)
            if path is not None:
                paths.setdefault(path)
        if len(paths) < 2:
            raise ConfigError("model.feature_norm: standardize needs at least two training images")
        model.fit_feature_norm(torch.stack([proc.image(p) for p in paths]))

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        from ..train.optim import param_groups
        lr = self.r.optim.lr
        plr = self.r.train.projector_lr if self.r.train.projector_lr is not None else lr
        # the LLM's parameters carry its own names (model.*, lm_head.*, ...): everything but the projector
        return param_groups(model, lambda name: ("projector", plr) if name.startswith("projector.") else ("llm", lr),
                            self.r.optim.weight_decay)

    def fsdp_units(self, model: VLM) -> List[nn.Module]:
        if self.r.train.stage != 2:
            return []
        inner = getattr(model.llm, "model", None)
        return list(getattr(inner, "layers", []))

    def build_loader(self):
        from .data import VLMLoader, VLMProcessor, count_cut, read_llava_json
        d = self.r.data
        records, proc = read_llava_json(d.train), VLMProcessor(self.model, d.image_folder)
        if self.dist.rank == 0:
            cut, scanned = count_cut(records, proc)
            if cut:
                log.warning("model.max_length %d cuts %d of the first %d training conversations: their answers "
                            "after the cut are never trained (raise model.max_length, or use a tokenizer that "
                            "writes the template in fewer tokens)", proc.max_length, cut, scanned)
        return VLMLoader(records, proc, d.batch_size,
                         seed=self.r.train.seed, rank=self.dist.rank, world_size=self.dist.world_size)

    def micro_step(self, batch: Dict[str, Any], scale: float, log: StepLog, step: int) -> torch.Tensor:
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with self.autocast():
            logits = self.model(b["input_ids"], b["attention_mask"], b["pixel_values"])
        terms = {"ce": answer_loss(logits, b["labels"])}
        log.add(terms, scale)
        return self.total(terms)

    def save_model(self, model: VLM, folder: str, state_dict=None) -> None:
        model.save_pretrained(folder, state_dict=state_dict)

    def read_model_state(self, folder: str) -> Dict[str, torch.Tensor]:
        return read_weights(folder)  # model.safetensors + llm/model.safetensors
