"""The paper's post-hoc loss balancing (section 4) as a command: ``qlip balance RECIPE --out DIR``.

1. a reconstruction-only probe run of the recipe (``loss.alpha_a = 0``; text tower dropped),
2. an alignment-only probe run (``loss.alpha_r = alpha_q = alpha_z = 0``; bottleneck and decoder
   frozen and never run),
3. ``L(inf)`` = mean of the last ``tail`` fraction of the logged ``mse`` / ``contrastive`` values
   (both probes log every step),
4. ``alpha_r / alpha_a = L_align(inf) / L_mse(inf)`` (:func:`qlip.losses.balanced_loss_weights`),
   keeping the recipe's ``alpha_a``; the balanced recipe is written as ``OUT/NAME.balanced.yaml``
   for a recipe ``NAME.yaml`` (the recipe with the overrides applied and the new ``loss.alpha_r``),
   beside the probe runs: never next to the recipe, which may lie inside the installed package.

Both probes use the recipe's model, data and optimiser (``--steps`` replaces ``optim.steps``; the
warm-up is then capped at a fifth of the steps). They live in ``OUT/recon`` and ``OUT/align``,
are checkpointed as usual, and a rerun reuses a finished probe or resumes an interrupted one.
Single process only (run it before launching the distributed stage-1 job).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..errors import ConfigError
from .recipe import Recipe, apply_overrides, load_recipe

__all__ = ["balance", "default_output", "tail_mean"]


def tail_mean(log_path: str, key: str, tail: float) -> float:
    """Mean of ``key`` over the last ``tail`` fraction (at least one) of the records of a log.jsonl."""
    values: List[float] = []
    try:
        with open(log_path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if key in rec:
                    values.append(float(rec[key]))
    except FileNotFoundError:
        raise ConfigError(f"{log_path}: no training log") from None
    if not values:
        raise ConfigError(f"{log_path}: no {key!r} values logged")
    n = max(1, int(round(len(values) * tail)))
    return sum(values[-n:]) / n


def default_output(recipe_path: str, out_dir: str) -> str:
    """``OUT/NAME.balanced.yaml`` for the recipe ``.../NAME.yaml`` (or ``.yml``)."""
    name = os.path.basename(recipe_path)
    for ext in (".yaml", ".yml"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return os.path.join(out_dir, name + ".balanced.yaml")


def _plain(x):
    """Tuples (from ``key=(a, b)`` overrides) as lists, so that yaml.safe_dump can write them."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _probe(recipe: Recipe, kind: str, steps: Optional[int]) -> Recipe:
    d = recipe.to_dict()
    loss, optim, train = d["loss"], d["optim"], d["train"]
    if kind == "recon":
        loss["alpha_a"] = 0.0
        if loss["alpha_r"] == 0:
            loss["alpha_r"] = 1.0
    else:
        loss.update(alpha_r=0.0, alpha_q=0.0, alpha_z=0.0, alpha_a=loss["alpha_a"] or 1.0)
    loss.update(alpha_p=0.0, alpha_g=0.0)
    if steps is not None:
        optim["steps"] = int(steps)
        optim["warmup_steps"] = min(optim["warmup_steps"], int(steps) // 5)
    train["log_every"] = 1
    train["max_time_s"] = None
    return Recipe.from_dict(d)


def _run(recipe: Recipe, out: str) -> str:
    """Train a probe unless a finished one with the same number of steps is there; returns its log."""
    from .engine import train
    summary_path = os.path.join(out, "summary.json")
    log_path = os.path.join(out, "log.jsonl")
    if os.path.isfile(summary_path) and os.path.isfile(log_path):
        with open(summary_path, encoding="utf-8") as f:
            done = json.load(f)
        if done.get("steps") == recipe.optim.steps and done.get("stopped_by") == "steps":
            return log_path
    train(recipe, out, resume=True)
    return log_path


def balance(recipe_path: str, overrides: Sequence[str], out_dir: str, steps: Optional[int] = None,
            tail: float = 0.2, output: Optional[str] = None) -> Dict[str, Any]:
    """Run the two probe runs of ``recipe_path`` (+ ``overrides``) under ``out_dir`` and write the
    balanced recipe (default ``out_dir/NAME.balanced.yaml``). Returns the numbers (see module docstring)."""
    if not 0 < tail <= 1:
        raise ConfigError(f"tail must be in (0, 1], got {tail}")
    if steps is not None and steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    recipe = load_recipe(recipe_path, overrides)
    if recipe.train.stage != 1:
        raise ConfigError("balancing is for stage 1 (reconstruction vs alignment); the recipe is stage 2")
    from ..losses import balanced_loss_weights
    align_weight = recipe.loss.alpha_a if recipe.loss.alpha_a > 0 else 1.0
    recon_log = _run(_probe(recipe, "recon", steps), os.path.join(out_dir, "recon"))
    align_log = _run(_probe(recipe, "align", steps), os.path.join(out_dir, "align"))
    l_mse = tail_mean(recon_log, recipe.loss.recon_kind, tail)  # the alpha_r term, logged under its kind
    l_align = tail_mean(align_log, "contrastive", tail)
    alpha_r, alpha_a = balanced_loss_weights(l_align, l_mse, align_weight=align_weight)

    with open(recipe_path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    raw = apply_overrides(raw, overrides)
    raw["loss"] = dict(raw.get("loss") or {})
    raw["loss"]["alpha_r"] = float(alpha_r)
    raw["loss"]["alpha_a"] = float(alpha_a)
    Recipe.from_dict(raw)  # still a valid recipe
    if output is None:
        output = default_output(recipe_path, out_dir)
    header = (f"# balanced by `qlip balance` (paper section 4): alpha_r / alpha_a = L_align(inf) / L_mse(inf)\n"
              f"#   = {l_align:.6g} / {l_mse:.6g} = {l_align / l_mse:.6g}  (probe runs in {out_dir}, "
              f"{recipe.optim.steps if steps is None else steps} steps, tail {tail})\n")
    from ..io import atomic_write_text
    atomic_write_text(output, header + yaml.safe_dump(_plain(raw), sort_keys=False))
    return {"l_mse_inf": l_mse, "l_align_inf": l_align, "ratio": l_align / l_mse, "alpha_r": alpha_r,
            "alpha_a": alpha_a, "output": output, "recon_run": os.path.dirname(recon_log),
            "align_run": os.path.dirname(align_log), "steps": recipe.optim.steps if steps is None else steps,
            "tail": tail}
