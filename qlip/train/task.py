"""What a model brings to the training engine: a :class:`Task`.

The engine (:mod:`qlip.train.engine`) owns everything that does not depend on the model: the
loop, gradient accumulation, the all-reduce of gradients and FSDP, clipping, the non-finite-step
skip, the learning-rate schedule, logging and progress, checkpoints and exact resume,
``max_time_s``. A task owns the rest, through the small interface below (open_clip's
``TrainingTask`` and lingua's model-side hooks are the models):

* ``build_model`` / ``build_loader``: the model (already frozen where the recipe says so) and a
  resumable batch source (an iterable of batch dicts with ``state_dict()``, ``load_state_dict()``
  and a ``stats`` dict whose ``"skipped"`` counts corrupt samples);
* ``param_groups``: the optimizer's groups (``params``, ``names``, ``lr``, ``weight_decay``, ``name``);
* ``fsdp_units``: the submodules to shard with FSDP2 (lingua's grouping plan);
* ``micro_step``: one micro-batch's forward; returns the loss to back-propagate (the engine scales
  it by ``1 / grad_accum`` and calls ``backward``) or ``None`` when the task ran its own backward
  passes (gradient caching); named loss terms go to :class:`StepLog`;
* ``loss_weights``: term name -> weight. The optimised loss and the logged ``loss`` are both
  :meth:`Task.total` of the terms, so the two cannot drift apart;
* ``before_step`` / ``after_step``: per optimizer step (a discriminator's own optimizer, a
  logit-scale clamp);
* ``extra_state`` / ``load_extra_state``: what else a checkpoint must hold (a discriminator);
* ``save_model``: writes the model in its loadable format (checkpoints and the final model);
* ``evaluate``: an optional evaluation hook, every ``train.eval_every`` steps and at the end.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

from ..nn.precision import resolve_precision
from .distributed import DistInfo
from .recipe import Recipe


class StepLog:
    """Accumulates a step's detached loss terms over micro-batches and chunks.

    ``add(terms, weight)``: ``weight`` is the fraction of the step's batch the terms were computed
    on (``1 / grad_accum`` for a micro-batch, times a chunk's share under gradient caching), so
    the values at the end of the step are means over the step's samples."""

    def __init__(self) -> None:
        self.values: Dict[str, float] = {}

    def add(self, terms: Mapping[str, Any], weight: float) -> None:
        for k, v in terms.items():
            v = float(v.detach()) if torch.is_tensor(v) else float(v)
            self.values[k] = self.values.get(k, 0.0) + v * weight


class Task:
    """Base class of training tasks. Subclasses set ``name`` and ``sections`` and implement
    :meth:`build_model`, :meth:`build_loader` and :meth:`micro_step`; the other hooks have
    sensible defaults."""

    name: str = ""
    sections: Dict[str, type] = {}  # recipe sections: the task's own and extensions of the engine's

    def __init__(self, recipe: Recipe, dist: DistInfo):
        self.r, self.dist, self.device = recipe, dist, dist.device
        self.model: Optional[nn.Module] = None
        # train.precision "auto" resolved on this device: bf16 autocast where bf16 matmul is fast
        self.precision = resolve_precision(recipe.train.precision, dist.device)

    # ---- recipe ----------------------------------------------------------------------------
    @classmethod
    def validate_recipe(cls, recipe: Recipe) -> None:
        """Checks that span sections (raise ConfigError); the sections check their own keys."""

    # ---- setup -----------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_loader(self):
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        from .optim import param_groups
        return param_groups(model, lambda name: ("all", self.r.optim.lr), self.r.optim.weight_decay)

    def fsdp_units(self, model: nn.Module) -> List[nn.Module]:
        return []

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimizer is built (e.g. to build a second one for a discriminator)."""

    # ---- the step --------------------------------------------------------------------------
    loss_weights: Dict[str, float] = {}

    def total(self, terms: Mapping[str, Any]):
        """The weighted sum of the loss terms: what is optimised and what is logged as ``loss``."""
        out = 0.0
        for k, w in self.loss_weights.items():
            if k in terms:
                out = out + w * terms[k]
        return out

    def train_mode(self, model: nn.Module) -> None:
        model.train()

    def before_step(self, step: int) -> None:
        pass

    def micro_step(self, batch: Dict[str, Any], scale: float, log: StepLog, step: int) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After the optimizer step ``step`` (0-based) was taken or skipped."""

    def batch_size(self, batch: Dict[str, Any]) -> int:
        """Samples in a batch (for the samples/s figure)."""
        for v in batch.values():
            if torch.is_tensor(v):
                return int(v.shape[0])
            if isinstance(v, list):
                return len(v)
        return 0

    def progress_label(self) -> str:
        """The progress bar's label."""
        return self.name

    def step_logs(self) -> Dict[str, float]:
        """Extra values for a log record (not averaged over ranks), e.g. the logit scale."""
        return {}

    def autocast(self):
        if self.precision.name == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- state -----------------------------------------------------------------------------
    def extra_state(self) -> Dict[str, Any]:
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        pass

    def save_model(self, model: nn.Module, folder: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        raise NotImplementedError

    def read_model_state(self, folder: str) -> Dict[str, torch.Tensor]:
        """The model's full state dict from a folder written by :meth:`save_model` (a checkpoint,
        to resume from). Default: the folder's ``model.safetensors``; a task whose save format
        splits the weights over several files joins them here."""
        from ..io import read_state_dict
        return read_state_dict(folder)

    def evaluate(self, model: nn.Module, step: int) -> Dict[str, float]:
        return {}
