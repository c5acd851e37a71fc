"""The ``um3`` training task: one model learns text, image-to-text and text-to-image at once.

    task: um3
    model: {init: path/to/llama-folder, qk_norm: true}          # any Hugging Face LlamaForCausalLM
    data: {text: corpus.txt, tokens: data/shapes-tokens, batch_size: 8, seq_len: 160,
           r0: 0.6, rT: 0.3, calm_down_steps: 200, mixing: calm_down}
    loss: {softmax: split}                                      # Eq. 6 (or joint: the ablation)
    optim: {optimizer: adamw, lr: 1e-3, warmup_steps: 20, steps: 400}

The engine (:mod:`qlip.train.engine`) runs the loop, checkpoints and resume; this task builds the
model (:func:`qlip.um3.model.from_llama`), the mixed loader (:mod:`qlip.um3.mixing`) and the loss
(:mod:`qlip.um3.loss`). The loss of a micro-batch is the sum of its target tokens' negative
log-likelihoods divided by the **global** number of target tokens times the number of ranks, so
after the engine's mean over ranks it is the token mean of the global batch: N ranks equal one
process. The evaluation hook reports held-out text cross-entropy and perplexity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..train import StepLog, Task
from ..train.recipe import DataSection, check
from .loss import LOSSES
from .mixing import I2T, KINDS, MixConfig, MixedLoader, segment_masks, text_windows, tokenize_corpus
from .model import UM3, VISUAL_INITS, from_llama, save_um3
from .schedule import SCHEDULES
from .vocab import LAYOUTS


@dataclass
class UM3ModelSection:
    init: Optional[str] = None          # HF LlamaForCausalLM folder (config.json, safetensors, tokenizer.json)
    qk_norm: bool = True                # RMSNorm over each head's q and k (paper); false = plain Llama attention
    bits: int = 28                      # QLIP token bits (must match the token shards)
    groups: int = 2                     # sub-tokens per QLIP token
    grad_checkpointing: bool = False
    visual_init: str = "mean"           # mean (paper Sec. 4.1) | bits (ours: + a projection of the row's bits)
    visual_bits: bool = False           # ours: + learned per-bit vectors on the visual rows (qlip.um3.model.VisualBits)
    # subtoken: one sequence position per sub-token (paper) | token (ours): one per QLIP token, its
    # sub-tokens predicted one after another from that position (qlip.um3.vocab, docs/um3.md)
    layout: str = "subtoken"

    def validate(self) -> None:
        check("model.visual_init", self.visual_init, " or ".join(VISUAL_INITS), self.visual_init in VISUAL_INITS)
        check("model.layout", self.layout, " or ".join(LAYOUTS), self.layout in LAYOUTS)
        if not self.init:
            raise ConfigError("model.init is empty: give a Hugging Face Llama folder to start from "
                              "(qlip um3 tiny-llama writes a tiny random one)")
        check("model.groups", self.groups, f"a divisor of model.bits={self.bits}",
              self.groups >= 1 and self.bits % self.groups == 0 and self.bits // self.groups <= 31)


@dataclass
class UM3DataSection(DataSection):
    text: Optional[Any] = None          # text file(s) / glob(s): the text-only corpus
    tokens: Optional[str] = None        # QLIP token shards (`qlip data tokenize`) with captions
    seq_len: int = 256
    r0: float = 0.5                     # Eq. 7: text-only fraction at step 0
    rT: float = 0.2                     # ... from step calm_down_steps on
    calm_down_steps: int = 1000         # Eq. 7's T
    mixing: str = "calm_down"           # calm_down | constant (r_T from the start; ablation)
    i2t_share: float = 0.5              # image-to-text share of the multimodal rows
    cfg_dropout: float = 0.1            # text-to-image captions dropped (for classifier-free guidance)
    i2t_from: int = 0                   # ours: image-to-text rows only from this step on (drawing first)
    # ours: an image-to-text row <bos> <boi> image <eoi> caption <eos> also scores its image, which is
    # exactly guidance's unconditional drawing row (with loss.average: rows, image and caption then
    # count as two segments, each like a row of its own)
    i2t_image_loss: bool = False
    val_fraction: float = 0.05          # the text corpus' last fraction, held out
    eval_batches: int = 4

    def validate(self) -> None:
        super().validate()
        check("data.seq_len", self.seq_len, ">= 8", self.seq_len >= 8)
        for k in ("r0", "rT", "i2t_share", "cfg_dropout"):
            check(f"data.{k}", getattr(self, k), "in [0, 1]", 0 <= getattr(self, k) <= 1)
        check("data.calm_down_steps", self.calm_down_steps, ">= 0", self.calm_down_steps >= 0)
        check("data.i2t_from", self.i2t_from, ">= 0", self.i2t_from >= 0)
        check("data.mixing", self.mixing, f"one of {SCHEDULES}", self.mixing in SCHEDULES)
        check("data.val_fraction", self.val_fraction, "in (0, 1)", 0 < self.val_fraction < 1)
        check("data.eval_batches", self.eval_batches, ">= 1", self.eval_batches >= 1)


AVERAGES = ("tokens", "rows")


@dataclass
class UM3LossSection:
    softmax: str = "split"              # split (Eq. 6) | joint (ablation)
    # tokens: the mean over every target token of the batch (the LM default; a 256-sub-token drawing
    # then outweighs a 15-token caption 17 to 1) | rows: each row's token mean, then the mean over
    # rows (every sample counts once, so Eq. 7's mix is the mix of the loss too)
    average: str = "tokens"

    def validate(self) -> None:
        check("loss.softmax", self.softmax, f"one of {tuple(LOSSES)}", self.softmax in LOSSES)
        check("loss.average", self.average, "tokens or rows", self.average in AVERAGES)


class UM3Task(Task):
    name = "um3"
    sections = {"model": UM3ModelSection, "data": UM3DataSection, "loss": UM3LossSection}
    loss_weights = {"ce": 1.0}

    @classmethod
    def validate_recipe(cls, recipe) -> None:
        if not recipe.data.text or not recipe.data.tokens:
            raise ConfigError("the um3 task needs data.text (a text corpus) and data.tokens (QLIP token shards)")

    # ---- setup -----------------------------------------------------------------------------------
    def build_model(self) -> UM3:
        m = self.r.model
        model, self.tokenizer = from_llama(m.init, bits=m.bits, groups=m.groups, qk_norm=m.qk_norm,
                                           visual_init=m.visual_init, visual_bits=m.visual_bits, layout=m.layout)
        model.lm.grad_checkpointing = m.grad_checkpointing
        self.model = model
        self._text_ids = None
        return model

    def _text(self):
        """(train, held-out) token ids of the text corpus."""
        if self._text_ids is None:
            ids = tokenize_corpus(self.r.data.text, self.tokenizer)
            cut = int(len(ids) * (1 - self.r.data.val_fraction))
            self._text_ids = (ids[:cut], ids[cut:])
        return self._text_ids

    def build_loader(self) -> MixedLoader:
        from ..data.tokens import TokenShardDataset
        d = self.r.data
        images = TokenShardDataset(d.tokens)  # memory-mapped ids, captions, bits
        mix = MixConfig(batch_size=d.batch_size, seq_len=d.seq_len, r0=d.r0, rT=d.rT, T=d.calm_down_steps,
                        schedule=d.mixing, i2t_share=d.i2t_share, cfg_dropout=d.cfg_dropout, i2t_from=d.i2t_from,
                        i2t_image_loss=d.i2t_image_loss, grad_accum=self.r.train.grad_accum)
        return MixedLoader(self._text()[0], images, self.model.vocab, self.tokenizer, mix, seed=self.r.train.seed,
                           rank=self.dist.rank, world_size=self.dist.world_size)

    def fsdp_units(self, model: UM3) -> List[nn.Module]:
        return [m for _, m in model.fsdp_units()]

    # ---- the step --------------------------------------------------------------------------------
    def micro_step(self, batch: Dict[str, Any], scale: float, log: StepLog, step: int) -> torch.Tensor:
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device, non_blocking=True)
        kind = batch["kind"].to(self.device)
        with self.autocast():  # logits only where there is a target (the same values as LOSSES[softmax])
            nll = self.model.nll(tokens[:, :-1], labels, self.r.loss.softmax)  # (b, T), 0 where no target
        world = self.dist.world_size
        first, second = segment_masks(labels, batch["split"])
        if self.r.loss.average == "rows":  # every segment's token mean, then the mean over the global
            # batch's segments (a row is one segment, an image-to-text row scoring its image two); the
            # engine's mean over ranks then gives the global mean: N ranks equal one process
            seg_sum = torch.stack([(nll * first).sum(1), (nll * second).sum(1)], 1)
            seg_n = torch.stack([first.sum(1), second.sum(1)], 1)
            ce = (seg_sum / seg_n.clamp(min=1)).sum() * world / batch["n_segments"].clamp(min=1).to(nll.device)
        else:
            ce = nll.sum() * world / batch["n_targets"].clamp(min=1).to(nll.device)
        terms: Dict[str, Any] = {"ce": ce}
        nd = nll.detach()
        row = nd.sum(1)
        for k, name in enumerate(KINDS):  # per-kind token means over the global batch (logged only;
            # an image-to-text row's caption only)
            part = (nd * second).sum(1) if k == I2T else row
            terms[f"ce_{name}"] = part[kind == k].sum() * world / batch["n_kind"][k].clamp(min=1).to(row.device)
        terms["text_fraction"] = float(batch["text_fraction"])
        log.add(terms, scale)
        return self.total(terms)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> Dict[str, float]:
        """Held-out text: cross-entropy (nats per token, under the trained softmax) and perplexity."""
        from ..train.distributed import mean_scalars
        held = self._text()[1]
        d = self.r.data
        if len(held) < d.seq_len + 2:
            return {}
        total = 0.0
        for i in range(d.eval_batches):
            t = text_windows(held, d.batch_size, d.seq_len, i).to(self.device)
            with self.autocast():
                total += float(model.nll(t[:, :-1], t[:, 1:], self.r.loss.softmax).mean())
        ce = mean_scalars({"ce": total / d.eval_batches}, self.dist)["ce"]
        return {"text_ce": ce, "text_ppl": math.exp(min(ce, 50.0))}

    def save_model(self, model: UM3, folder: str, state_dict=None) -> None:
        save_um3(model, self.tokenizer, folder, state_dict)
