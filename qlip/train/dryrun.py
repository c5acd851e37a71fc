"""``qlip train RECIPE --dry-run``: everything a run would check before its first step, no training.

Loads and validates the recipe (every key, by :func:`qlip.train.recipe.load_recipe`), builds the
task's model on the meta device (shapes only: no memory, no weights, so L-14 takes seconds;
``model.init`` / ``init_eva_clip`` / ``init_open_clip`` are named but not loaded: the preset's
shapes are counted, as a random initialisation would build them), counts parameters, forms the
optimizer groups with their learning rates, expands the data shards and prints the plan: per-rank
batch, accumulation, global batch, steps and samples seen. Writes ``OUT/dry_run.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List

from ..errors import ConfigError, DataError
from .recipe import Recipe


def _data_summary(train: Any) -> Dict[str, Any]:
    """Shard count of data.train (brace patterns expanded); local shards missing on this machine
    are reported, not an error: a dry run is usually made before the data is there."""
    from ..data.pipeline import _is_remote, expand_shards
    if train is None:
        return {"spec": None, "note": "data.train is empty (set it before training)"}
    if isinstance(train, str) and train.endswith((".csv", ".tsv")):
        return {"spec": train, "csv": True, "exists": os.path.exists(train)}
    try:
        urls = expand_shards(train)
    except DataError as e:
        return {"spec": train, "note": f"not available on this machine: {e}"}
    return {"spec": train, "shards": len(urls), "remote": sum(_is_remote(u) for u in urls),
            "first": urls[0], "last": urls[-1]}


def dry_run(recipe: Recipe, out: str, recipe_path: str = "", world_size: int = 0) -> Dict[str, Any]:
    """Check and describe the recipe's run; returns the report (also written to OUT/dry_run.json)."""
    from .plan import build_task, count_parameters, _variant
    if recipe.task != "qlip":
        raise ConfigError(f"--dry-run knows the qlip task's model, not task {recipe.task!r}")
    notes: List[str] = []
    m = recipe.model
    if m.init:
        state = "exists" if os.path.exists(m.init) else "does not exist yet"
        notes.append(f"model.init {m.init} {state}: not loaded in a dry run; counted the shapes of preset "
                     f"{m.preset} (random init)")
    for key in ("init_eva_clip", "init_open_clip"):
        if getattr(m, key):
            notes.append(f"model.{key} {getattr(m, key)} is not loaded in a dry run (random init counted)")
    task, model = build_task(_variant(recipe), "meta")
    cfg = model.config
    params = count_parameters(recipe, (task, model))
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    d, t, o = recipe.data, recipe.train, recipe.optim
    glob_batch = d.batch_size * world * t.grad_accum
    report = {
        "recipe": recipe_path, "task": recipe.task, "stage": t.stage,
        "model": {"preset": m.preset, "built_on": "meta (shapes only, random init; nothing loaded)",
                  "image_size": cfg.vision.image_size, "patch_size": cfg.vision.patch_size,
                  "tokens": cfg.grid ** 2,
                  "vision": f"{cfg.vision.width} x {cfg.vision.depth}",
                  "decoder": f"{cfg.decoder.width} x {cfg.decoder.depth}",
                  "text": None if model.text is None else f"{cfg.text.width} x {cfg.text.depth}",
                  "bits": cfg.quantizer.bits, "grad_checkpointing": m.grad_checkpointing},
        "parameters": params,
        "plan": {"world_size": world, "per_rank_batch": d.batch_size, "grad_accum": t.grad_accum,
                 "contrastive_chunk": getattr(t, "contrastive_chunk", 0), "global_batch": glob_batch,
                 "steps": o.steps, "warmup_steps": o.warmup_steps, "samples_seen": glob_batch * o.steps,
                 "optimizer": o.optimizer, "schedule": o.schedule, "precision": t.precision, "fsdp": t.fsdp},
        "loss": dataclasses.asdict(recipe.loss),
        "data": _data_summary(d.train),
        "notes": notes,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "dry_run.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def format_dry_run(r: Dict[str, Any]) -> str:
    p, mo, pa = r["plan"], r["model"], r["parameters"]
    lines = [f"dry run of {r['recipe'] or 'recipe'} (task {r['task']}, stage {r['stage']}): recipe keys valid",
             f"model    {mo['preset']}: {mo['image_size']} px, patch {mo['patch_size']}, vision {mo['vision']}, "
             f"decoder {mo['decoder']}, text {mo['text']}, {mo['bits']} bits; built on {mo['built_on']}",
             f"params   {pa['total']:,} total, {pa['trainable']:,} trainable; "
             + ", ".join(f"{k} {v:,}" for k, v in pa["per_module"].items())
             + (f"; LPIPS {pa['lpips']:,}" if pa["lpips"] else "")
             + (f"; discriminator {pa['discriminator']:,}" if pa["discriminator"] else ""),
             f"batch    {p['per_rank_batch']} per rank x {p['grad_accum']} accumulation x {p['world_size']} "
             f"rank(s) = {p['global_batch']:,} global"
             + (f"; gradient caching in chunks of {p['contrastive_chunk']}" if p["contrastive_chunk"] else ""),
             f"schedule {p['steps']:,} steps ({p['warmup_steps']:,} warm-up, {p['schedule']}, {p['optimizer']}, "
             f"{p['precision']}), {p['samples_seen']:,} samples seen"]
    for g in pa["groups"]:
        lines.append(f"group    {g['name']:<14} lr {g['lr']:<8g} wd {g['weight_decay']:<5g} "
                     f"{g['tensors']:>4} tensors {g['parameters']:>13,} params")
    data = r["data"]
    lines.append("data     " + (data.get("note") or (f"{data['shards']} shard(s) ({data['remote']} remote): "
                                                     f"{data['first']} .. {data['last']}" if "shards" in data
                                                     else f"{data['spec']} (csv, exists: {data['exists']})")))
    lines += [f"note     {n}" for n in r["notes"]]
    lines.append("nothing trained (dry run)")
    return "\n".join(lines)
