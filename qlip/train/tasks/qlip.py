"""QLIP's training task: both stages of the paper (section 4, Table 8), for the engine.

Stage 1: vision encoder + text tower + bottleneck + decoder,
         ``alpha_r * MSE + alpha_q * L_BSQ + alpha_a * InfoNCE + alpha_z * ||sg(Z_hat) - Z||^2``.
Stage 2: text tower dropped, vision encoder frozen; bottleneck + decoder,
         ``alpha_r * MSE + alpha_q * L_BSQ + alpha_p * LPIPS + alpha_g * GAN`` with its own
         discriminator optimizer.
Setting loss weights to 0 gives the baselines of the paper's Figure 1 / Table 3a: ``alpha_a = 0``
is reconstruction-only (text tower dropped), ``alpha_r = alpha_q = alpha_z = 0`` is CLIP-only
(bottleneck and decoder frozen and never run).

The contrastive loss gathers features across ranks with gradients and the BSQ codebook entropy
averages the code distribution over all ranks' tokens (qlip.nn.collectives), so N ranks x batch
b trains exactly like 1 rank x N*b. With ``train.contrastive_chunk`` the contrastive step is
gradient-cached (qlip.losses.gradcache), the codebook entropy still that of the whole batch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError, DataError
from ...model import QLIP, get_preset
from ..recipe import DataSection, OptimSection, Recipe, TrainSection, _flatten, check
from ..task import StepLog, Task

log = logging.getLogger("qlip.train")


# ---- recipe sections ------------------------------------------------------------------------
@dataclass
class ModelSection:
    preset: Optional[str] = "qlip-demo"      # preset name for random init
    overrides: Dict[str, Any] = field(default_factory=dict)   # dotted config keys, e.g. vision.depth
    init: Optional[str] = None               # qlip.load-able checkpoint to start from (stage 2: stage 1 output)
    init_open_clip: Optional[str] = None     # "ARCH:PRETRAINED" open_clip weights for the text tower
    init_eva_clip: Optional[str] = None      # EVA-CLIP vision tower: "EVA02-B-16:TAG" (open_clip) or "timm:NAME"
    drop_text: bool = False                  # drop the text tower (reconstruction-only runs, stage 2)
    decoder_head: Optional[str] = None       # replace the decoder's pixel head of model.init with a fresh one
    decoder_head_channels: int = 16          # ("linear" / "conv", DecoderConfig.head): stage 2 only
    grad_checkpointing: bool = False

    def validate(self) -> None:
        for name in ("preset", "init", "init_open_clip", "init_eva_clip"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"model.{name} must be a string, got {v!r}")
        self.overrides = _flatten(self.overrides, "model.overrides")


@dataclass
class QLIPDataSection(DataSection):
    image_root: Optional[str] = None         # for CSV files with relative paths
    cache_mb: int = 0                        # keep up to this many MB of decoded images (and of tar shards' raw
                                             # samples) in memory after the first epoch: a small dataset read
                                             # many times (the demo: 6 epochs) skips decoding; the same batches

    def validate(self) -> None:
        super().validate()
        check("data.cache_mb", self.cache_mb, ">= 0", isinstance(self.cache_mb, int) and self.cache_mb >= 0)
        if self.image_root is not None and not isinstance(self.image_root, str):
            raise ConfigError(f"data.image_root must be a string, got {self.image_root!r}")


@dataclass
class QLIPOptimSection(OptimSection):
    lr_visual: Optional[float] = None        # vision encoder (E_v); None -> lr; 0 -> frozen
    lr_text: Optional[float] = None          # text encoder (E_t)
    lr_generator: Optional[float] = None     # bottleneck + decoder (G)

    def validate(self) -> None:
        super().validate()
        for name in ("lr_visual", "lr_text", "lr_generator"):
            v = getattr(self, name)
            check(f"optim.{name}", v, ">= 0 (0 = frozen) or empty (= optim.lr)", v is None or v >= 0)


@dataclass
class LossSection:
    alpha_r: float = 1.0      # reconstruction (recon_kind)
    alpha_q: float = 1.0      # BSQ entropy/commitment loss
    alpha_a: float = 1.0      # contrastive alignment
    alpha_z: float = 0.0      # paper's commitment ||sg(Z_hat) - Z||^2 (needs decoder width == vision width)
    alpha_p: float = 0.0      # LPIPS
    alpha_g: float = 0.0      # GAN (generator side)
    alpha_s: float = 0.0      # stage 2: 1 - cos(E(x_hat), E(x)) with the frozen encoder (qlip/losses/semantic.py)
    semantic_features: str = "embedding"  # alpha_s on: embedding (pooled image embedding) | tokens (every token)
    recon_kind: str = "mse"   # mse (paper) | l1 (BSQ-ViT's): the alpha_r term, logged under this name
    lpips_net: str = "vgg"    # LPIPS trunk: vgg (paper) | alex | squeeze
    lpips_backbone: str = "auto"  # auto: the real trunk weights or a one-line error; random: explicit opt-in
    hard_negatives: bool = False  # score each image against a hard-negative caption ({key}.neg.txt) too
    # ours, off: + this weight x the bits' squared cross-correlations over the batch, inside the BSQ
    # loss (so scaled by alpha_q too; qlip.quant.bsq.cross_correlation, docs/demo.md "Ninth round")
    bit_decorrelation: float = 0.0
    logit_scale_max: float = 4.6052   # ln(100), clamp as CLIP does

    def validate(self) -> None:
        if self.lpips_net not in ("vgg", "alex", "squeeze"):
            raise ConfigError(f"loss.lpips_net must be vgg, alex or squeeze, got {self.lpips_net!r}")
        if self.lpips_backbone not in ("auto", "pretrained", "random"):
            raise ConfigError(f"loss.lpips_backbone must be auto, pretrained or random, got {self.lpips_backbone!r}")
        from ...losses.reconstruction import RECONSTRUCTION_KINDS
        if self.recon_kind not in RECONSTRUCTION_KINDS:
            raise ConfigError(f"loss.recon_kind must be one of {', '.join(RECONSTRUCTION_KINDS)}, got {self.recon_kind!r}")
        if self.semantic_features not in ("embedding", "tokens"):
            raise ConfigError(f"loss.semantic_features must be embedding or tokens, got {self.semantic_features!r}")
        for name in ("alpha_r", "alpha_q", "alpha_a", "alpha_z", "alpha_p", "alpha_g", "alpha_s", "bit_decorrelation"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0")
        check("loss.logit_scale_max", self.logit_scale_max, "> 0", self.logit_scale_max > 0)


@dataclass
class GANSection:
    kind: str = "hinge"        # hinge | non_saturating
    disc_lr: float = 1e-4
    disc_betas: Tuple[float, float] = (0.5, 0.9)
    disc_start: int = 0        # step at which the discriminator (and alpha_g) switch on
    disc_channels: int = 64
    disc_layers: int = 3
    r1_gamma: float = 0.0
    r1_every: int = 16

    def validate(self) -> None:
        if self.kind not in ("hinge", "non_saturating"):
            raise ConfigError(f"gan.kind must be hinge or non_saturating, got {self.kind!r}")
        check("gan.disc_lr", self.disc_lr, "> 0", self.disc_lr > 0)
        check("gan.disc_betas", list(self.disc_betas), "two values in [0, 1)",
              len(self.disc_betas) == 2 and all(0 <= b < 1 for b in self.disc_betas))
        check("gan.disc_start", self.disc_start, ">= 0", self.disc_start >= 0)
        check("gan.disc_channels", self.disc_channels, ">= 1", self.disc_channels >= 1)
        check("gan.disc_layers", self.disc_layers, ">= 1", self.disc_layers >= 1)
        check("gan.r1_gamma", self.r1_gamma, ">= 0", self.r1_gamma >= 0)
        check("gan.r1_every", self.r1_every, ">= 1", self.r1_every >= 1)


@dataclass
class QLIPTrainSection(TrainSection):
    stage: int = 1
    contrastive_chunk: int = 0 # >0: gradient caching with chunks of this many samples

    def validate(self) -> None:
        super().validate()
        if self.stage not in (1, 2):
            raise ConfigError(f"train.stage must be 1 or 2, got {self.stage}")
        check("train.contrastive_chunk", self.contrastive_chunk, ">= 0 (0 = off)", self.contrastive_chunk >= 0)


# ---- the task -------------------------------------------------------------------------------
def build_model(recipe: Recipe) -> QLIP:
    """The recipe's QLIP: a preset (with overrides) or a ``qlip.load``-able checkpoint, then the
    optional EVA-CLIP / open_clip initialisations."""
    m = recipe.model
    if m.init:
        from ...io import load
        model = load(m.init)
        if m.overrides:
            raise ConfigError("model.overrides apply to presets; a model.init checkpoint keeps its config")
    elif m.preset:
        model = QLIP(get_preset(m.preset, **m.overrides))
    else:
        raise ConfigError("the recipe needs model.preset or model.init")
    if m.decoder_head is not None:
        if not m.init:
            raise ConfigError("model.decoder_head replaces the head of a model.init checkpoint; for a preset set "
                              "model.overrides.decoder.head")
        model = model.with_decoder_head(m.decoder_head, m.decoder_head_channels)
    if m.init_eva_clip:
        from ...io.init_weights import init_visual_from_eva_clip
        report = init_visual_from_eva_clip(model, m.init_eva_clip)
        log.info("vision encoder initialised from %s: %d tensors, pos_embed %s, proj %s%s", report["source"],
                 report["tensors"], report["pos_embed"], report["proj"],
                 "".join(f"; {n}" for n in report["notes"]))
    if m.init_open_clip:
        from ...io.init_weights import init_text_from_open_clip
        init_text_from_open_clip(model, m.init_open_clip)
    return model


_LR_GROUPS = {"visual": "visual", "text": "text", "bottleneck": "generator", "decoder": "generator"}


def qlip_param_groups(model: nn.Module, o: QLIPOptimSection) -> List[Dict]:
    """Groups by module (visual -> lr_visual, text -> lr_text, bottleneck + decoder ->
    lr_generator, the rest -> lr) x (decay, no decay); lr 0 leaves a module out."""
    from ..optim import param_groups
    lrs = {"visual": o.lr_visual, "text": o.lr_text, "bottleneck": o.lr_generator, "decoder": o.lr_generator}

    def assign(name: str):
        module = name.split(".", 1)[0]
        lr = lrs.get(module)
        return _LR_GROUPS.get(module, "other"), (o.lr if lr is None else lr)

    return param_groups(model, assign, o.weight_decay)


class QLIPTask(Task):
    name = "qlip"
    sections = {"model": ModelSection, "data": QLIPDataSection, "optim": QLIPOptimSection,
                "loss": LossSection, "gan": GANSection, "train": QLIPTrainSection}

    @classmethod
    def validate_recipe(cls, r: Recipe) -> None:
        l, t = r.loss, r.train
        if t.stage == 2 and l.alpha_a > 0:
            raise ConfigError("stage 2 drops the text tower: set loss.alpha_a to 0")
        if l.alpha_s > 0 and t.stage != 2:
            raise ConfigError("loss.alpha_s (embedding consistency through the frozen encoder) is a stage-2 term: "
                              "in stage 1 the encoder is being trained; set train.stage=2 or loss.alpha_s=0")
        if l.alpha_a == 0 and l.alpha_r == l.alpha_q == l.alpha_z == l.alpha_p == l.alpha_g == 0:
            raise ConfigError("every loss weight is 0: nothing to train")
        if t.contrastive_chunk and (l.alpha_p > 0 or l.alpha_g > 0):
            raise ConfigError("gradient caching (train.contrastive_chunk) is for stage 1 (no LPIPS/GAN)")

    def __init__(self, recipe: Recipe, dist):
        super().__init__(recipe, dist)
        L, t = recipe.loss, recipe.train
        self.need_text = L.alpha_a > 0
        self.need_recon = t.stage == 2 or any(w > 0 for w in (L.alpha_r, L.alpha_q, L.alpha_z, L.alpha_p,
                                                                L.alpha_g, L.alpha_s))
        # the one place where the loss is weighted: optimised and logged totals both use it
        # (g_gan comes weighted and switched on at gan.disc_start by qlip.losses.AdversarialLoss)
        self.loss_weights = {L.recon_kind: L.alpha_r, "quant": L.alpha_q, "contrastive": L.alpha_a, "commit_z": L.alpha_z,
                             "lpips": L.alpha_p, "semantic": L.alpha_s, "g_gan": 1.0}
        self.contrastive = self.lpips = self.adv = self.d_opt = None
        self._fake = None

    # ---- setup -----------------------------------------------------------------------------
    def build_model(self) -> QLIP:
        r, t, L = self.r, self.r.train, self.r.loss
        model = build_model(r).to(self.device)
        if (not self.need_text or r.model.drop_text or t.stage == 2) and model.text is not None:
            model.drop_text()
        if self.need_text and model.text is None:
            raise ConfigError("loss.alpha_a > 0 needs a text tower, but the model has none")
        if L.alpha_z > 0 and model.config.decoder.width != model.config.vision.width:
            raise ConfigError("loss.alpha_z (||sg(Z_hat) - Z||) needs decoder width == vision width")
        model.quantizer.decorrelation = float(L.bit_decorrelation)  # a training-loss weight, not saved
        if t.stage == 2:
            model.visual.requires_grad_(False)
            model.logit_scale.requires_grad_(False)
        if not self.need_recon:
            model.bottleneck.requires_grad_(False)
            model.decoder.requires_grad_(False)
        o = r.optim
        for name, lr in (("visual", o.lr_visual), ("text", o.lr_text), ("bottleneck", o.lr_generator),
                         ("decoder", o.lr_generator)):
            if lr == 0 and getattr(model, name) is not None:  # lr 0 = frozen (paper Table 8)
                getattr(model, name).requires_grad_(False)
        if r.model.grad_checkpointing:
            for tower in (model.visual, model.decoder, model.text):
                if tower is not None:
                    tower.transformer.grad_checkpointing = True
        self.model = model
        self._build_losses()
        return model

    def _build_losses(self) -> None:
        from ...losses import ContrastiveLoss
        L, g = self.r.loss, self.r.gan
        self.contrastive = ContrastiveLoss()
        if L.alpha_p > 0:
            from ...losses import PerceptualLoss
            self.lpips = PerceptualLoss(net=L.lpips_net, backbone=L.lpips_backbone, input_mean=self.model.image_mean,
                                        input_std=self.model.image_std).to(self.device)
        if L.alpha_g > 0:
            from ...losses import AdversarialLoss, PatchDiscriminator
            disc = PatchDiscriminator(base_channels=g.disc_channels, num_layers=g.disc_layers)
            self.adv = AdversarialLoss(disc, kind=g.kind, weight=L.alpha_g, start_step=g.disc_start,
                                       r1_gamma=g.r1_gamma, r1_every=g.r1_every).to(self.device)
            self.d_opt = torch.optim.AdamW(self.adv.discriminator.parameters(), lr=g.disc_lr,
                                           betas=tuple(g.disc_betas), weight_decay=1e-4)

    def param_groups(self, model: nn.Module) -> List[Dict[str, Any]]:
        return qlip_param_groups(model, self.r.optim)

    def fsdp_units(self, model: QLIP) -> List[nn.Module]:
        """Every transformer block of the vision encoder, the text tower and the decoder."""
        return [b for tower in (model.visual, model.text, model.decoder) if tower is not None
                for b in tower.transformer.blocks]

    def build_loader(self):
        from ...data.pipeline import csv_loader, image_transform, webdataset_loader
        from ..distributed import RankSlice
        d, dist = self.r.data, self.dist
        if not d.train:
            raise ConfigError("data.train is empty: give shards (e.g. data/shapes-train-*.tar) or a .csv")
        m = self.model
        tf = image_transform(m.image_size, m.image_mean, m.image_std)
        tok = m.tokenizer if self.need_text else None
        # data.global_batches: read the single-process stream of global batches on every rank and
        # keep this rank's slice (batches do not depend on the number of ranks)
        sliced = d.global_batches and dist.enabled
        rank, world = (0, 1) if sliced else (dist.rank, dist.world_size)
        batch = d.batch_size * dist.world_size if sliced else d.batch_size
        opts = dict(seed=self.r.train.seed, rank=rank, world_size=world,
                    num_workers=d.workers, shuffle_buffer=d.shuffle_buffer, infinite=True, cache_mb=d.cache_mb)
        if isinstance(d.train, str) and d.train.endswith((".csv", ".tsv")):
            loader = csv_loader(d.train, tf, tok, batch, image_root=d.image_root, **opts)
        else:
            loader = webdataset_loader(d.train, tf, tok, batch, **opts)
        return RankSlice(loader, dist.rank, dist.world_size) if sliced else loader

    def train_mode(self, model: QLIP) -> None:
        model.train()
        if self.r.train.stage == 2:
            model.visual.eval()

    def progress_label(self) -> str:
        return f"stage {self.r.train.stage}"

    def batch_size(self, batch: Dict[str, Any]) -> int:
        return int(batch["images"].shape[0])

    # ---- the step --------------------------------------------------------------------------
    def before_step(self, step: int) -> None:
        if self.d_opt is not None:
            self.d_opt.zero_grad(set_to_none=True)

    def micro_step(self, batch: Dict[str, Any], scale: float, log: StepLog, step: int) -> Optional[torch.Tensor]:
        images = batch["images"].to(self.device, non_blocking=True)
        loss = None
        if self.need_text:
            self._contrastive_step(batch, images, scale, log, step)
        else:
            _, loss = self.image_terms(images, log, scale, step)
        if self.adv is not None and self.adv.discriminator_active(step):
            with self.autocast():
                d_total, d_stats = self.adv.discriminator_loss(self._pm1(images), self._fake, step)
            (d_total.float() * scale).backward()
            log.add(d_stats, scale)
        return loss

    def image_terms(self, images: torch.Tensor, log: StepLog, weight: float, step: int = 0):
        """The image side of a step. Returns (normalised image embedding or None, weighted image
        loss or None); the detached terms go to ``log`` scaled by ``weight`` (the chunk's share)."""
        L, m = self.r.loss, self.model
        grad = torch.is_grad_enabled()
        decode = self.need_recon and grad  # gradient-cache phase 1 needs only the embedding
        with self.autocast():
            p = m.image_pass(images, embed=self.need_text, until="decode" if decode else "encode",
                             quant_loss=True, encoder_grad=self.r.train.stage != 2)
        if not decode:
            return p.image_embeds, None
        from ...losses import reconstruction_loss
        recon = p.recon.float()
        terms = {L.recon_kind: reconstruction_loss(recon, images, L.recon_kind), "quant": p.quant_loss}
        if L.alpha_z > 0:
            terms["commit_z"] = F.mse_loss(p.z.float(), p.z_hat.detach().float())
        if self.lpips is not None:
            terms["lpips"] = self.lpips(recon, images)
        if L.alpha_s > 0:  # stage 2 only (recipe check): the encoder is frozen, h has no graph
            from ...losses import embedding_consistency_loss
            with self.autocast():
                if L.semantic_features == "tokens":
                    terms["semantic"] = embedding_consistency_loss(m.visual, recon, p.h)
                else:
                    terms["semantic"] = embedding_consistency_loss(lambda x: m.visual.pool(m.visual(x)), recon,
                                                                   m.visual.pool(p.h))
        if self.adv is not None:
            fake = self._pm1(recon)  # the discriminator sees images in [-1, 1]
            terms["g_gan"] = self.adv.generator_loss(fake, step)
            self._fake = fake.detach()
        log.add({**terms, **{f"bsq_{k}": v for k, v in p.quant_stats.items()}}, weight)
        return p.image_embeds, self.total(terms)

    def _pm1(self, x: torch.Tensor) -> torch.Tensor:
        from ...losses import normalized_to_pm1
        return normalized_to_pm1(x, self.model.image_mean, self.model.image_std)

    def text_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model.encode_text(tokens, normalize=True).float()

    def _contrastive_step(self, batch: Dict[str, Any], images: torch.Tensor, scale: float, log: StepLog,
                          step: int) -> None:
        """Stage-1 step with the InfoNCE term, gradient-cached when ``train.contrastive_chunk > 0``.
        With ``loss.hard_negatives`` the image-to-text softmax also scores one hard-negative
        caption per image (``{key}.neg.txt`` in the shards, NegCLIP-style), cached and
        re-forwarded like the captions."""
        from ...losses import grad_cache_step
        L, t = self.r.loss, self.r.train
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        negatives = self._negative_tokens(batch) if L.hard_negatives else None
        n = images.shape[0]
        chunk = t.contrastive_chunk if t.contrastive_chunk > 0 else n

        q = self.model.quantizer
        # the BSQ codebook entropy is a statistic of the whole batch: with chunks, phase 1 (no
        # graph) also sums the chunks' soft code distributions, and phase 2 evaluates the entropy
        # of that whole-batch distribution with each chunk's share of its gradient
        whole = chunk < n and self.need_recon and q.gamma_1 > 0
        codes = {"sum": None, "n": 0, "ref": None}

        def image_fn(x):
            if whole and not torch.is_grad_enabled():  # phase 1
                emb, (psum, cnt) = self._image_embedding_and_codes(x)
                codes["sum"] = psum if codes["sum"] is None else codes["sum"] + psum
                codes["n"] += cnt
                return emb
            if whole:  # phase 2
                if codes["ref"] is None:
                    codes["ref"] = q.reference_from_sums(codes["sum"], codes["n"])
                with q.codebook_reference(*codes["ref"]):
                    emb, extra = self.image_terms(x, log, scale * x.shape[0] / n, step)
            else:
                emb, extra = self.image_terms(x, log, scale * x.shape[0] / n, step)
            return emb if extra is None else (emb, extra * scale)

        out = grad_cache_step(image_fn, self.text_embed, images, tokens, self.contrastive, chunk,
                              logit_scale=self.model.logit_scale.exp(),
                              align_weight=self.loss_weights["contrastive"] * scale, text_negatives=negatives)
        log.add({"contrastive": out.contrastive_loss}, scale)

    @torch.no_grad()
    def _image_embedding_and_codes(self, images: torch.Tensor):
        """Gradient-cache phase 1 with the codebook entropy on: the normalised image embedding and
        ``(sum of the tokens' soft code distributions, token count)``."""
        with self.autocast():
            p = self.model.image_pass(images, until="project")
        return p.image_embeds, self.model.quantizer.code_distribution_sum(p.u)

    def _negative_tokens(self, batch: Dict[str, Any]) -> torch.Tensor:
        if "neg_tokens" not in batch:
            raise DataError("loss.hard_negatives needs shards whose samples carry a {key}.neg.txt caption "
                            "(e.g. `qlip data shapes`); this batch has none")
        return batch["neg_tokens"].to(self.device, non_blocking=True)

    def after_step(self, step: int) -> None:
        from ...losses import clamp_logit_scale_
        from ...nn.collectives import all_reduce_gradients_
        if self.model.logit_scale.requires_grad:
            clamp_logit_scale_(self.model.logit_scale, max=self.r.loss.logit_scale_max)
        if self.d_opt is not None and self.adv.discriminator_active(step):
            all_reduce_gradients_(list(self.adv.discriminator.parameters()))
            self.d_opt.step()

    def step_logs(self) -> Dict[str, float]:
        return {"logit_scale": float(self.model.logit_scale.detach().exp())}

    # ---- state -----------------------------------------------------------------------------
    def extra_state(self) -> Dict[str, Any]:
        if self.adv is None:
            return {}
        return {"discriminator": self.adv.discriminator.state_dict(), "d_optimizer": self.d_opt.state_dict()}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        if self.adv is not None:
            self.adv.discriminator.load_state_dict(state["discriminator"])
            self.d_opt.load_state_dict(state["d_optimizer"])

    def save_model(self, model: QLIP, folder: str, state_dict=None) -> None:
        model.save_pretrained(folder, state_dict=state_dict)
