"""How a demo's training run continues under ``--resume``, written once for the demos
(``qlip demo``, ``t2i``, ``um3``): a finished run (its ``summary.json`` says it reached the
recipe's steps and its final model exists) is reused; an interrupted one continues from its
latest checkpoint through the engine's exact resume; otherwise the run starts over. A run whose
saved ``recipe.yaml`` differs from the recipe asked for now (a changed demo setting, or a newer
version of the demo) is neither reused nor continued: ``stale_run`` moves it aside and says which
settings changed."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable, Dict, List, Optional, Sequence


def finished_run(run_dir: str, steps: int, resume: bool,
                 also_done: Optional[Callable[[Dict[str, Any]], bool]] = None) -> Optional[Dict[str, Any]]:
    """``run_dir``'s summary when ``resume`` is asked for and the run finished: it trained ``steps``
    steps (or ``also_done(summary)`` holds, e.g. a run stopped by its time limit) and its final model
    is on disk; else None."""
    summ = os.path.join(run_dir, "summary.json")
    if not (resume and os.path.isfile(summ)):
        return None
    with open(summ, encoding="utf-8") as f:
        s = json.load(f)
    done = s.get("steps") == steps or (also_done is not None and also_done(s))
    return s if done and os.path.isdir(s.get("final_model", "")) else None


def can_resume(run_dir: str, resume: bool) -> bool:
    """Whether ``resume`` is asked for and ``run_dir`` holds a checkpoint to continue from."""
    from ..train.state import latest_checkpoint
    return resume and latest_checkpoint(os.path.join(run_dir, "checkpoints")) is not None


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _shown(d: Dict[str, Any], key: str) -> str:
    return repr(d[key]) if key in d else "(absent)"


def setting_changes(old: Dict[str, Any], new: Dict[str, Any], skip: Sequence[str] = ()) -> List[str]:
    """``section.key: old -> new`` (``(absent)`` for a missing key) for every setting of two nested
    settings dicts that differs, in key order; the dotted keys in ``skip`` are not compared."""
    a, b = _flat(old), _flat(new)
    return [f"{k}: {_shown(a, k)} -> {_shown(b, k)}"
            for k in sorted(set(a) | set(b)) if k not in skip and a.get(k) != b.get(k)]


# settings that do not change what a run computes (logging, checkpoint cadence, the progress bar)
_IGNORED = ("train.log_every", "train.ckpt_every", "train.keep_ckpts", "train.progress", "train.tensorboard",
            "data.cache_mb")  # an in-memory cache: the same batches with or without it


def recipe_changes(run_dir: str, recipe, ignore: Sequence[str] = ()) -> List[str]:
    """``section.key: old -> new`` for every setting of ``recipe`` (a ``Recipe``) that differs from
    the one ``run_dir`` was trained with (its ``recipe.yaml``, read with today's defaults so that an
    option added since, at its default, is not a change). Empty when they agree or when the run has
    no ``recipe.yaml``; logging and checkpointing cadence and the keys in ``ignore`` (e.g. paths into
    the demo's own folder, which move with it) are not compared."""
    import yaml
    from ..errors import QLIPError
    from ..train.recipe import Recipe
    path = os.path.join(run_dir, "recipe.yaml")
    if not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            old = Recipe.from_dict(yaml.safe_load(f) or {}).to_dict()
    except (QLIPError, yaml.YAMLError) as e:  # an option removed since, or a damaged file
        return [f"recipe.yaml cannot be read with this version ({str(e).splitlines()[0]})"]
    return setting_changes(old, recipe.to_dict(), _IGNORED + tuple(ignore))


def stale_run(run_dir: str, recipe, resume: bool, label: str, upstream_new: bool = False,
              ignore: Sequence[str] = ()) -> bool:
    """Under ``resume``: True (and ``run_dir`` moved to ``run_dir + ".previous"``, replacing an older
    one, so that nothing trained is deleted) when the run there was trained with another recipe
    than ``recipe`` or from an input run retrained since (``upstream_new``), after printing why;
    False when it may be reused or continued (or there is nothing there)."""
    if not (resume and os.path.isdir(run_dir)):
        return False
    changes = ["its input run was trained again"] if upstream_new else recipe_changes(run_dir, recipe, ignore)
    return move_aside(run_dir, label, changes)


def move_aside(run_dir: str, label: str, changes: Sequence[str]) -> bool:
    """When ``changes`` (why the run in ``run_dir`` cannot be reused) is not empty: move the run to
    ``run_dir + ".previous"`` (replacing an older one there, so that nothing trained is deleted),
    print why and return True; else False."""
    if not changes or not os.path.isdir(run_dir):
        return False
    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    aside = run_dir.rstrip("/\\") + ".previous"
    if os.path.isdir(aside):
        shutil.rmtree(aside)
    os.replace(run_dir, aside)
    print(f"{label}: trained with other settings ({shown}): training it again (the old run moved to {aside})")
    return True
