"""The training engine: one loop for every model, configured by a recipe and driven by a task.

The engine knows no model. It runs the loop (``optim.steps`` optimizer steps of
``train.grad_accum`` micro-batches), averages the gradients over ranks (one bucketed all-reduce;
FSDP2 for the task's units with ``train.fsdp``), clips the global gradient norm, skips steps
whose norm is not finite, follows the learning-rate schedule, logs (``log.jsonl``, TensorBoard,
a progress bar), checkpoints atomically every ``train.ckpt_every`` steps and at the end, resumes
exactly (weights, optimizer, RNG states, data position, the task's extra state) and stops early
after ``train.max_time_s``. Everything model-specific comes from the task
(:class:`qlip.train.task.Task`; QLIP's two stages are :class:`qlip.train.tasks.qlip.QLIPTask`).

Distributed: launch with ``torchrun``; N ranks x batch b train like 1 rank x N*b as long as the
task's losses are global statistics (QLIP's are: see qlip.nn.collectives).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch

from ..errors import CheckpointError, DataError
from ..nn.collectives import all_reduce_gradients_
from . import distributed as D
from .optim import build_optimizer, set_lr
from .recipe import Recipe, recipe_to_yaml
from .state import latest_checkpoint, load_train_state, rng_state, save_checkpoint, set_rng_state
from .task import StepLog, Task
from .tasks import get_task

log = logging.getLogger("qlip.train")


class Engine:
    """Builds the task's model, optimizer and loader, then :meth:`train` runs the loop.

    ``loader``: an optional batch source replacing the task's (benchmarks, tests), with the same
    protocol (iterable of batch dicts, ``state_dict()``, ``load_state_dict()``, ``stats``)."""

    def __init__(self, recipe: Recipe, out_dir: str, resume: bool = False,
                 on_log: Optional[Callable[[Dict[str, Any]], None]] = None, loader=None):
        self.r, self.out, self.on_log = recipe, out_dir, on_log
        t = recipe.train
        self.dist = D.setup(t.device)
        self.device = self.dist.device
        torch.manual_seed(t.seed)
        self.task: Task = get_task(recipe.task)(recipe, self.dist)
        self.model = self.task.build_model().to(self.device)
        self.task.model = self.model
        log.info("precision: %s (%s)", self.task.precision.name, self.task.precision.reason)
        self.fsdp = bool(t.fsdp) and self.dist.enabled
        self.fsdp_units = 0
        if t.fsdp and not self.dist.enabled:
            log.warning("train.fsdp is ignored in a single process (launch with torchrun to shard)")
        if self.fsdp:
            D.check_fsdp_device(self.device)
            self.fsdp_units = D.shard_units(self.task.fsdp_units(self.model))
            log.info("FSDP: %d units sharded over %d ranks", self.fsdp_units, self.dist.world_size)
        if t.compile:  # per unit: the tasks call their models through methods other than forward
            for unit in self.task.fsdp_units(self.model):
                unit.compile()
        self.groups = self.task.param_groups(self.model)
        if not self.groups:
            raise DataError("nothing to train: every parameter is frozen or has learning rate 0")
        self.optimizer = build_optimizer(self.groups, recipe.optim, foreach=False if self.fsdp else None)
        self.task.check_optimizer(self.optimizer)
        self.params = [p for g in self.groups for p in g["params"]]
        # FSDP reduce-scatters its units' gradients itself; the rest is averaged by all_reduce_gradients_
        self.replicated = [p for p in self.params if not D.is_sharded(p)] if self.fsdp else self.params
        self.loader = loader if loader is not None else self.task.build_loader()
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

    # ---- one optimizer step ----------------------------------------------------------------
    def run_step(self, batches) -> Dict[str, Any]:
        """Accumulate ``train.grad_accum`` micro-batches, all-reduce, clip, step. Returns the
        step's (local) loss terms, the gradient norm and the number of samples."""
        t, o = self.r.train, self.r.optim
        lr_factor = set_lr(self.optimizer, self.step, o)
        self.optimizer.zero_grad(set_to_none=True)
        self.task.before_step(self.step)
        log_ = StepLog()
        n = 0
        scale = 1.0 / t.grad_accum
        for _ in range(t.grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                raise DataError("the training data yielded no batch (too few samples for one batch?)") from None
            loss = self.task.micro_step(batch, scale, log_, self.step)
            if loss is not None:
                (loss * scale).backward()
            n += self.task.batch_size(batch)
        all_reduce_gradients_(self.replicated)
        # float64 sum of squares for sharded and replicated gradients alike: 1 process == N ranks
        grad_norm = D.clip_grad_norm_(self.params, o.grad_clip if o.grad_clip > 0 else float("inf"))
        if torch.isfinite(grad_norm):  # the same on every rank (gradients are all-reduced)
            self.optimizer.step()
        else:  # a NaN/inf would poison the weights and the optimizer state: skip the update
            self.nonfinite_steps += 1
            log.warning("step %d: non-finite gradient norm, update skipped (%d so far)",
                        self.step + 1, self.nonfinite_steps)
        self.task.after_step(self.step)
        self.step += 1
        return {"terms": log_.values, "grad_norm": float(grad_norm), "samples": n, "lr_factor": lr_factor}

    # ---- the loop --------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        r, t = self.r, self.r.train
        self.task.train_mode(self.model)
        bar = self._progress()
        batches = iter(self.loader)
        start_time, start_step = time.time() - self.elapsed, self.step
        window_t, window_n = time.time(), 0
        last: Dict[str, Any] = {}
        stop_reason = "steps"
        while self.step < r.optim.steps:
            out = self.run_step(batches)
            window_n += out["samples"] * self.dist.world_size
            self.elapsed = time.time() - start_time
            if self.step % t.log_every == 0 or self.step == r.optim.steps:
                now = time.time()
                rec = {"step": self.step, "time": round(self.elapsed, 3), "lr_factor": out["lr_factor"],
                       "grad_norm": out["grad_norm"], "samples_per_s": window_n / max(now - window_t, 1e-9),
                       **self.task.step_logs(), "skipped": self._skipped()}
                rec.update(D.mean_scalars(out["terms"], self.dist))
                rec["loss"] = float(self.task.total(rec))
                window_t, window_n = now, 0
                last = rec
                self._log(rec)
                if bar is not None:
                    bar.set_postfix(loss=f"{rec['loss']:.4g}", per_s=f"{rec['samples_per_s']:.0f}")
            if bar is not None:
                bar.update(1)
            if t.ckpt_every and self.step % t.ckpt_every == 0:
                self.save()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < r.optim.steps:
                self._evaluate()
            if t.max_time_s and self.elapsed >= t.max_time_s and self.step < r.optim.steps:
                stop_reason = "max_time_s"
                break
        if bar is not None:
            bar.close()
        self.save()
        final = os.path.join(self.out, "final")
        full = D.full_state_dict(self.model) if self.fsdp else None  # collective: every rank
        if self.dist.is_main:
            self.task.save_model(self.model, final, state_dict=full)
        D.barrier(self.dist)
        evals = self._evaluate() if t.eval_every else {}
        skipped = self._skipped()
        summary = {"task": r.task, "steps": self.step, "stopped_by": stop_reason,
                   "elapsed_s": round(self.elapsed, 1), "steps_this_run": self.step - start_step,
                   "skipped_samples": skipped, "nonfinite_steps": self.nonfinite_steps,
                   "fsdp_sharded_units": self.fsdp_units, "precision": self.task.precision.name,
                   "final_model": final, "last_log": last}
        if evals:
            summary["eval"] = evals
        if self.dist.is_main:
            with open(os.path.join(self.out, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
            if skipped:
                log.warning("skipped %d corrupt or unreadable samples during training", skipped)
        if getattr(self, "_tb", None) is not None:  # closed, not left to interpreter exit
            self._tb.close()
            del self._tb  # (a later log opens a new writer)
        D.barrier(self.dist)  # the ranks leave together (see distributed.exit_process for the exit)
        return summary

    def _evaluate(self) -> Dict[str, float]:
        self.model.eval()
        try:
            res = self.task.evaluate(self.model, self.step)
        finally:
            self.task.train_mode(self.model)
        if res:
            self._log({"step": self.step, **{f"eval/{k}": v for k, v in res.items()}}, eval_record=True)
        return res

    def _skipped(self) -> int:
        """Samples skipped as corrupt so far, summed over ranks (collective when distributed)."""
        n = int(self.loader.stats.get("skipped", 0))
        if self.dist.enabled and not getattr(self.loader, "replicated", False):
            n = int(round(D.mean_scalar(n, self.dist) * self.dist.world_size))
        return n

    def _progress(self):
        if not (self.r.train.progress and self.dist.is_main):
            return None
        from tqdm import tqdm
        return tqdm(total=self.r.optim.steps, initial=self.step, desc=self.task.progress_label(),
                    unit="step", dynamic_ncols=True, leave=False)

    # ---- logging ---------------------------------------------------------------------------
    def _log(self, rec: Dict[str, Any], eval_record: bool = False) -> None:
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
        if self.on_log is not None and not eval_record:
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
        st.update(self.task.extra_state())
        return st

    def save(self) -> None:
        if self._saved_step == self.step:  # e.g. the final save right after a periodic one
            return
        st = self.state()
        full = D.full_state_dict(self.model) if self.fsdp else None  # collective: every rank
        if self.dist.is_main:
            save_checkpoint(self.ckpt_root, self.step, self.model, st, keep=self.r.train.keep_ckpts,
                            model_state=full, save_model=self.task.save_model)
        self._saved_step = self.step
        D.barrier(self.dist)

    def _resume(self) -> None:
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_root)
            return
        from ..io import load_state_dict_strict
        sd = self.task.read_model_state(path)
        load_state_dict_strict(self.model, D.shard_state_like(self.model, sd) if self.fsdp else sd, path)
        st = load_train_state(path)
        try:
            self.optimizer.load_state_dict(st["optimizer"])
            if self.fsdp:
                D.shard_optimizer_state_(self.optimizer)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit this recipe's parameter groups "
                                  f"(optimizer, lr_* = 0 or frozen modules changed?): {e}") from None
        self.task.load_extra_state(st)
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
    """Train ``recipe`` into ``out_dir`` (``resume``: from its latest checkpoint); the summary."""
    engine = Engine(recipe, out_dir, resume=resume, **kw)
    try:
        return engine.train()
    finally:
        D.teardown(engine.dist)
