"""One trainer for both QLIP stages (paper section 4, Table 8), configured by a Recipe.

Stage 1: vision encoder + text tower + bottleneck + decoder,
         ``alpha_r * MSE + alpha_q * L_BSQ + alpha_a * InfoNCE + alpha_z * ||sg(Z_hat) - Z||^2``.
Stage 2: text tower dropped, vision encoder frozen; bottleneck + decoder,
         ``alpha_r * MSE + alpha_q * L_BSQ + alpha_p * LPIPS + alpha_g * GAN`` with its own
         discriminator optimizer.
Setting loss weights to 0 gives the baselines of the paper's Figure 1 / Table 3a: ``alpha_a = 0``
is reconstruction-only (text tower dropped), ``alpha_r = alpha_q = alpha_z = 0`` is CLIP-only
(bottleneck and decoder frozen and never run).

Distributed: launch with ``torchrun``; gradients are averaged with one bucketed all-reduce after
the backward passes of a step (see qlip.train.distributed). The contrastive loss gathers
features across ranks with gradients and the BSQ codebook entropy averages the code distribution
over all ranks' tokens (qlip.nn.collectives), so N ranks x batch b trains exactly like 1 rank x N*b.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, DataError
from ..model import QLIP, get_preset
from . import distributed as D
from .optim import build_optimizer, param_groups, set_lr
from .recipe import Recipe, recipe_to_yaml
from .state import latest_checkpoint, load_train_state, rng_state, save_checkpoint, set_rng_state

log = logging.getLogger("qlip.train")


def build_model(recipe: Recipe) -> QLIP:
    m = recipe.model
    if m.init:
        from ..io import load
        model = load(m.init)
        if m.overrides:
            raise ConfigError("model.overrides apply to presets; a model.init checkpoint keeps its config")
    elif m.preset:
        model = QLIP(get_preset(m.preset, **m.overrides))
    else:
        raise ConfigError("the recipe needs model.preset or model.init")
    if m.init_eva_clip:
        from .init import init_visual_from_eva_clip
        report = init_visual_from_eva_clip(model, m.init_eva_clip)
        log.info("vision encoder initialised from %s: %d tensors, pos_embed %s, proj %s%s", report["source"],
                 report["tensors"], report["pos_embed"], report["proj"],
                 "".join(f"; {n}" for n in report["notes"]))
    if m.init_open_clip:
        from .init import init_text_from_open_clip
        init_text_from_open_clip(model, m.init_open_clip)
    return model


class Trainer:
    def __init__(self, recipe: Recipe, out_dir: str, resume: bool = False,
                 on_log: Optional[Callable[[Dict[str, Any]], None]] = None, loader=None):
        """``loader``: optional batch source replacing the one built from ``data`` (benchmarks,
        tests): an iterable of ``{"images", "tokens"}`` dicts with ``state_dict()``,
        ``load_state_dict()`` and a ``stats`` dict."""
        self.r, self.out = recipe, out_dir
        t, L = recipe.train, recipe.loss
        self.dist = D.setup(t.device)
        self.device = self.dist.device
        self.on_log = on_log
        torch.manual_seed(t.seed)
        self.model = build_model(recipe).to(self.device)
        self.need_text = L.alpha_a > 0
        self.need_recon = t.stage == 2 or any(w > 0 for w in (L.alpha_r, L.alpha_q, L.alpha_z, L.alpha_p, L.alpha_g,
                                                                L.alpha_s))
        if (not self.need_text or recipe.model.drop_text or t.stage == 2) and self.model.text is not None:
            self.model.drop_text()
        if self.need_text and self.model.text is None:
            raise ConfigError("loss.alpha_a > 0 needs a text tower, but the model has none")
        if L.alpha_z > 0 and self.model.config.decoder.width != self.model.config.vision.width:
            raise ConfigError("loss.alpha_z (||sg(Z_hat) - Z||) needs decoder width == vision width")
        if t.stage == 2:
            self.model.visual.requires_grad_(False)
            self.model.logit_scale.requires_grad_(False)
        if not self.need_recon:
            self.model.bottleneck.requires_grad_(False)
            self.model.decoder.requires_grad_(False)
        o = recipe.optim
        for name, lr in (("visual", o.lr_visual), ("text", o.lr_text), ("bottleneck", o.lr_generator),
                         ("decoder", o.lr_generator)):
            if lr == 0 and getattr(self.model, name) is not None:  # lr 0 = frozen (paper Table 8)
                getattr(self.model, name).requires_grad_(False)
        if recipe.model.grad_checkpointing:
            for tower in (self.model.visual, self.model.decoder, self.model.text):
                if tower is not None:
                    tower.transformer.grad_checkpointing = True
        self.fsdp = bool(t.fsdp) and self.dist.enabled
        self.fsdp_blocks = 0
        if t.fsdp and not self.dist.enabled:
            log.warning("train.fsdp is ignored in a single process (launch with torchrun to shard)")
        if self.fsdp:
            self.fsdp_blocks = D.shard_blocks(self.model)
            log.info("FSDP: %d transformer blocks sharded over %d ranks", self.fsdp_blocks, self.dist.world_size)
        self.groups = param_groups(self.model, recipe.optim)
        self.optimizer = build_optimizer(self.groups, recipe.optim, foreach=False if self.fsdp else None)
        self.params = [p for g in self.groups for p in g["params"]]
        # FSDP reduce-scatters the blocks' gradients itself; the rest is averaged by all_reduce_gradients_
        self.replicated = [p for p in self.params if not D.is_sharded(p)] if self.fsdp else self.params
        self._build_losses()
        self.loader = loader if loader is not None else self._build_loader()
        self.step, self.elapsed = 0, 0.0
        self.nonfinite_steps = 0
        self._saved_step = -1
        self.ckpt_root = os.path.join(out_dir, "checkpoints")
        if self.dist.is_main:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "recipe.yaml"), "w", encoding="utf-8") as f:
                f.write(recipe_to_yaml(recipe))
        if resume:
            self._resume()

    # ---- setup -----------------------------------------------------------------------------
    def _build_losses(self) -> None:
        from ..losses import ContrastiveLoss
        L, g = self.r.loss, self.r.gan
        self.contrastive = ContrastiveLoss()
        self.lpips = None
        if L.alpha_p > 0:
            from ..losses import PerceptualLoss
            self.lpips = PerceptualLoss(net=L.lpips_net, input_mean=self.model.image_mean,
                                        input_std=self.model.image_std).to(self.device)
        self.adv, self.d_opt = None, None
        if L.alpha_g > 0:
            from ..losses import AdversarialLoss, PatchDiscriminator
            disc = PatchDiscriminator(base_channels=g.disc_channels, num_layers=g.disc_layers)
            self.adv = AdversarialLoss(disc, kind=g.kind, weight=L.alpha_g, start_step=g.disc_start,
                                       r1_gamma=g.r1_gamma, r1_every=g.r1_every).to(self.device)
            self.d_opt = torch.optim.AdamW(self.adv.discriminator.parameters(), lr=g.disc_lr,
                                           betas=tuple(g.disc_betas), weight_decay=1e-4)

    def _build_loader(self):
        from ..data.pipeline import csv_loader, image_transform, webdataset_loader
        d = self.r.data
        if not d.train:
            raise ConfigError("data.train is empty: give shards (e.g. data/shapes-train-*.tar) or a .csv")
        tf = image_transform(self.model.image_size, self.model.image_mean, self.model.image_std)
        tok = self.model.tokenizer if self.need_text else None
        # data.global_batches: read the single-process stream of global batches on every rank and
        # keep this rank's slice (batches do not depend on the number of ranks)
        sliced = d.global_batches and self.dist.enabled
        rank, world = (0, 1) if sliced else (self.dist.rank, self.dist.world_size)
        batch = d.batch_size * self.dist.world_size if sliced else d.batch_size
        opts = dict(seed=self.r.train.seed, rank=rank, world_size=world,
                    num_workers=d.workers, shuffle_buffer=d.shuffle_buffer, infinite=True)
        if isinstance(d.train, str) and d.train.endswith((".csv", ".tsv")):
            loader = csv_loader(d.train, tf, tok, batch, image_root=d.image_root, **opts)
        else:
            loader = webdataset_loader(d.train, tf, tok, batch, **opts)
        return D.RankSlice(loader, self.dist.rank, self.dist.world_size) if sliced else loader

    def _skipped(self) -> int:
        """Samples skipped as corrupt so far, summed over ranks (collective when distributed)."""
        n = int(self.loader.stats.get("skipped", 0))
        if self.dist.enabled and not getattr(self.loader, "replicated", False):
            n = int(round(D.mean_scalar(n, self.dist) * self.dist.world_size))
        return n

    def _autocast(self):
        if self.r.train.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ---- losses ----------------------------------------------------------------------------
    def _image_terms(self, images: torch.Tensor, logs: Dict[str, float], weight: float):
        """Image-side forward. Returns (normalised image embedding or None, weighted extra loss
        or None). ``logs`` accumulates detached terms scaled by ``weight`` (chunk fraction)."""
        L, m = self.r.loss, self.model
        grad = torch.is_grad_enabled()
        with self._autocast():
            if self.r.train.stage == 2:
                with torch.no_grad():
                    h = m.visual(images)
            else:
                h = m.visual(images)
            emb = F.normalize(m.visual.pool(h).float(), dim=-1) if self.need_text else None
            if not self.need_recon or not grad:  # gradient-cache phase 1 needs only the embedding
                return emb, None
            z = h[:, 1:]
            z_hat, _ids, qloss, qstats = m.bottleneck(z, compute_loss=True)
            recon = m.decoder(z_hat)
        recon = recon.float()
        mse = F.mse_loss(recon, images)
        extra = L.alpha_r * mse + L.alpha_q * qloss
        terms = {"mse": mse, "quant": qloss, **{f"bsq_{k}": v for k, v in qstats.items()}}
        if L.alpha_z > 0:
            commit = F.mse_loss(z.float(), z_hat.detach().float())
            extra = extra + L.alpha_z * commit
            terms["commit_z"] = commit
        if self.lpips is not None:
            lp = self.lpips(recon, images)
            extra = extra + L.alpha_p * lp
            terms["lpips"] = lp
        if L.alpha_s > 0:  # stage 2 only (recipe check): the encoder is frozen, h has no graph
            from ..losses import embedding_consistency_loss
            with self._autocast():
                if L.semantic_features == "tokens":
                    sem = embedding_consistency_loss(m.visual, recon, h)
                else:
                    sem = embedding_consistency_loss(lambda x: m.visual.pool(m.visual(x)), recon, m.visual.pool(h))
            extra = extra + L.alpha_s * sem
            terms["semantic"] = sem
        if self.adv is not None:
            fake = self._pm1(recon)  # the discriminator sees images in [-1, 1]
            g = self.adv.generator_loss(fake, self.step)
            extra = extra + g
            terms["g_gan"] = g
            self._fake = fake.detach()
        for k, v in terms.items():
            logs[k] = logs.get(k, 0.0) + float(v.detach()) * weight
        return emb, extra

    def _pm1(self, x: torch.Tensor) -> torch.Tensor:
        from ..losses import normalized_to_pm1
        return normalized_to_pm1(x, self.model.image_mean, self.model.image_std)

    def _text_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.encode_text(tokens, normalize=True).float()

    def _micro_step(self, batch: Dict[str, Any], scale: float, logs: Dict[str, float]) -> None:
        images = batch["images"].to(self.device, non_blocking=True)
        if self.need_text:
            self._contrastive_step(batch, images, scale, logs)
        else:
            _, extra = self._image_terms(images, logs, scale)
            (extra * scale).backward()
        if self.adv is not None and self.adv.discriminator_active(self.step):
            with self._autocast():
                d_total, d_stats = self.adv.discriminator_loss(self._pm1(images), self._fake, self.step)
            (d_total.float() * scale).backward()
            for k, v in d_stats.items():
                logs[k] = logs.get(k, 0.0) + float(v) * scale

    def _contrastive_step(self, batch: Dict[str, Any], images: torch.Tensor, scale: float,
                          logs: Dict[str, float]) -> None:
        """Stage-1 step with the InfoNCE term, gradient-cached when ``train.contrastive_chunk > 0``.
        With ``loss.hard_negatives`` the image-to-text softmax also scores one hard-negative
        caption per image (``{key}.neg.txt`` in the shards, NegCLIP-style), cached and
        re-forwarded like the captions."""
        from ..losses import grad_cache_step
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
                    emb, extra = self._image_terms(x, logs, scale * x.shape[0] / n)
            else:
                emb, extra = self._image_terms(x, logs, scale * x.shape[0] / n)
            return emb if extra is None else (emb, extra * scale)

        out = grad_cache_step(image_fn, self._text_embed, images, tokens, self.contrastive, chunk,
                              logit_scale=self.model.logit_scale.exp(), align_weight=L.alpha_a * scale,
                              text_negatives=negatives)
        logs["contrastive"] = logs.get("contrastive", 0.0) + float(out.contrastive_loss) * scale

    @torch.no_grad()
    def _image_embedding_and_codes(self, images: torch.Tensor):
        """Gradient-cache phase 1 with the codebook entropy on: the normalised image embedding and
        ``(sum of the tokens' soft code distributions, token count)``."""
        m = self.model
        with self._autocast():
            h = m.visual(images)
            emb = F.normalize(m.visual.pool(h).float(), dim=-1)
            u = m.bottleneck.project(h[:, 1:])
        return emb, m.quantizer.code_distribution_sum(u)

    def _negative_tokens(self, batch: Dict[str, Any]) -> torch.Tensor:
        if "neg_tokens" not in batch:
            raise DataError("loss.hard_negatives needs shards whose samples carry a {key}.neg.txt caption "
                            "(e.g. `qlip data shapes`); this batch has none")
        return batch["neg_tokens"].to(self.device, non_blocking=True)

    # ---- the loop --------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        r, t = self.r, self.r.train
        from ..losses import all_reduce_gradients_, clamp_logit_scale_
        self.model.train()
        if t.stage == 2:
            self.model.visual.eval()
        bar = self._progress()
        batches = iter(self.loader)
        start_time, start_step = time.time() - self.elapsed, self.step
        window_t, window_n = time.time(), 0
        last: Dict[str, Any] = {}
        stop_reason = "steps"
        while self.step < r.optim.steps:
            lr_factor = set_lr(self.optimizer, self.step, r.optim)
            self.optimizer.zero_grad(set_to_none=True)
            if self.d_opt is not None:
                self.d_opt.zero_grad(set_to_none=True)
            logs: Dict[str, float] = {}
            n_img = 0
            for _ in range(t.grad_accum):
                try:
                    batch = next(batches)
                except StopIteration:
                    raise DataError("the training data yielded no batch (too few samples for one batch?)") from None
                self._micro_step(batch, 1.0 / t.grad_accum, logs)
                n_img += batch["images"].shape[0]
            all_reduce_gradients_(self.replicated)
            clip = D.clip_grad_norm_ if self.fsdp else torch.nn.utils.clip_grad_norm_  # FSDP: sharded + replicated
            grad_norm = clip(self.params, r.optim.grad_clip if r.optim.grad_clip > 0 else float("inf"))
            if torch.isfinite(grad_norm):  # the same on every rank (gradients are all-reduced)
                self.optimizer.step()
            else:  # a NaN/inf would poison the weights and the optimizer state: skip the update
                self.nonfinite_steps += 1
                log.warning("step %d: non-finite gradient norm, update skipped (%d so far)",
                            self.step + 1, self.nonfinite_steps)
            if self.model.logit_scale.requires_grad:
                clamp_logit_scale_(self.model.logit_scale, max=r.loss.logit_scale_max)
            if self.d_opt is not None and self.adv.discriminator_active(self.step):
                all_reduce_gradients_(list(self.adv.discriminator.parameters()))
                self.d_opt.step()
            self.step += 1
            window_n += n_img * self.dist.world_size
            self.elapsed = time.time() - start_time
            if self.step % t.log_every == 0 or self.step == r.optim.steps:
                now = time.time()
                rec = {"step": self.step, "time": round(self.elapsed, 3),
                       "lr_factor": lr_factor, "grad_norm": float(grad_norm),
                       "img_per_s": window_n / max(now - window_t, 1e-9),
                       "logit_scale": float(self.model.logit_scale.detach().exp()),
                       "skipped": self._skipped()}
                rec.update({k: D.mean_scalar(v, self.dist) for k, v in sorted(logs.items())})
                rec["loss"] = self._total(rec)
                window_t, window_n = now, 0
                last = rec
                self._log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", img_s=f"{rec['img_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if t.ckpt_every and self.step % t.ckpt_every == 0:
                self.save()
            if t.max_time_s and self.elapsed >= t.max_time_s and self.step < r.optim.steps:
                stop_reason = "max_time_s"
                break
        if bar is not None:
            bar.close()
        self.save()
        final = os.path.join(self.out, "final")
        full = D.full_state_dict(self.model) if self.fsdp else None  # collective: every rank
        if self.dist.is_main:
            self.model.save_pretrained(final, state_dict=full)
        D.barrier(self.dist)
        skipped = self._skipped()
        summary = {"steps": self.step, "stopped_by": stop_reason, "elapsed_s": round(self.elapsed, 1),
                   "steps_this_run": self.step - start_step, "skipped_samples": skipped,
                   "nonfinite_steps": self.nonfinite_steps, "fsdp_sharded_blocks": self.fsdp_blocks,
                   "final_model": final, "last_log": last}
        if self.dist.is_main:
            with open(os.path.join(self.out, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            if skipped:
                log.warning("skipped %d corrupt or unreadable samples during training", skipped)
        return summary

    def _total(self, rec: Dict[str, float]) -> float:
        L = self.r.loss
        total = L.alpha_r * rec.get("mse", 0.0) + L.alpha_q * rec.get("quant", 0.0) + L.alpha_a * rec.get("contrastive", 0.0)
        total += L.alpha_z * rec.get("commit_z", 0.0) + L.alpha_p * rec.get("lpips", 0.0) + rec.get("g_gan", 0.0)
        total += L.alpha_s * rec.get("semantic", 0.0)
        return total

    def _progress(self):
        if not (self.r.train.progress and self.dist.is_main):
            return None
        from tqdm import tqdm
        return tqdm(total=self.r.optim.steps, initial=self.step, desc=f"stage {self.r.train.stage}",
                    unit="step", dynamic_ncols=True, leave=False)

    # ---- logging ---------------------------------------------------------------------------
    def _log(self, rec: Dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(os.path.join(self.out, "log.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        if self.r.train.tensorboard:
            w = self._writer()
            if w is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                        w.add_scalar(k, v, rec["step"])
                w.flush()
        if self.on_log is not None:
            self.on_log(rec)

    def _writer(self):
        if not hasattr(self, "_tb"):
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.out, "tb"))
            except ImportError:
                self._tb = None
        return self._tb

    # ---- checkpoints -----------------------------------------------------------------------
    def state(self) -> Dict[str, Any]:
        data_states = [self.loader.state_dict()]
        rngs = [rng_state()]
        if self.dist.enabled:
            data_states, rngs = _gather_objects(data_states[0]), _gather_objects(rngs[0])
        st = {"step": self.step, "elapsed": self.elapsed, "nonfinite_steps": self.nonfinite_steps,
              "optimizer": D.full_optimizer_state(self.optimizer) if self.fsdp else self.optimizer.state_dict(),
              "rng": rngs, "data": data_states, "recipe": json.dumps(self.r.to_dict())}
        if self.adv is not None:
            st["discriminator"] = self.adv.discriminator.state_dict()
            st["d_optimizer"] = self.d_opt.state_dict()
        return st

    def save(self) -> None:
        if self._saved_step == self.step:  # e.g. the final save right after a periodic one
            return
        st = self.state()
        full = D.full_state_dict(self.model) if self.fsdp else None  # collective: every rank
        if self.dist.is_main:
            save_checkpoint(self.ckpt_root, self.step, self.model, st, keep=self.r.train.keep_ckpts, model_state=full)
        self._saved_step = self.step
        D.barrier(self.dist)

    def _resume(self) -> None:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_root)
            return
        from ..io import load_state_dict_strict, read_state_dict
        sd = read_state_dict(path)
        load_state_dict_strict(self.model, D.shard_state_like(self.model, sd) if self.fsdp else sd, path)
        st = load_train_state(path)
        try:
            self.optimizer.load_state_dict(st["optimizer"])
            if self.fsdp:
                D.shard_optimizer_state_(self.optimizer)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this recipe's parameter groups "
                                  f"(optimizer, lr_* = 0 or frozen modules changed?): {e}") from None
        if self.adv is not None:
            self.adv.discriminator.load_state_dict(st["discriminator"])
            self.d_opt.load_state_dict(st["d_optimizer"])
        self.loader.load_state_dict(st["data"])
        set_rng_state(st["rng"][self.dist.rank] if len(st["rng"]) > self.dist.rank else st["rng"][0])
        self.step, self.elapsed = int(st["step"]), float(st["elapsed"])
        self.nonfinite_steps = int(st.get("nonfinite_steps", 0))
        self._saved_step = self.step
        if self.dist.is_main:
            _truncate_log(os.path.join(self.out, "log.jsonl"), self.step)
        log.info("resumed from %s at step %d", path, self.step)


def _gather_objects(obj) -> List[Any]:
    import torch.distributed as dist
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _truncate_log(path: str, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be redone)."""
    if not os.path.isfile(path):
        return
    from ..io import atomic_write_text
    keep = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):
                continue  # a line cut by the kill
    atomic_write_text(path, "".join(keep))


def train(recipe: Recipe, out_dir: str, resume: bool = False, **kw) -> Dict[str, Any]:
    trainer = Trainer(recipe, out_dir, resume=resume, **kw)
    try:
        return trainer.train()
    finally:
        D.teardown(trainer.dist)
