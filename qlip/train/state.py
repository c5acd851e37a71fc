"""Training checkpoints: written atomically, loaded without unpickling code.

Layout of ``OUT/checkpoints/``::

    step_00000500/            one checkpoint (a folder renamed into place when complete)
        config.json           our model format: qlip.load("OUT/checkpoints/step_00000500") works
        model.safetensors
        train_state.pt        optimizers, step, RNG states, data position, recipe
                              (torch.save of tensors and plain containers only; loaded with
                              torch.load(weights_only=True))
    latest                    name of the newest complete checkpoint (replaced atomically)

A run killed at any instant leaves either the previous checkpoint or the new complete one:
a checkpoint is written into ``step_XXXXXXXX.tmpNNNN/`` (files fsynced) and renamed into place,
then ``latest`` is replaced atomically; old checkpoints are pruned by renaming them to a
``*.tmp-del`` name before deleting, so a ``step_*`` folder seen on disk is always complete.
Stray ``*.tmp*`` entries of an interrupted write are removed on the next save. If ``latest``
names a folder that is gone (a kill between two renames), the newest complete ``step_*`` is used.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from ..errors import CheckpointError
from ..io.atomic import atomic_write_text, fsync_path

STATE_FILE = "train_state.pt"


def rng_state() -> Dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate()),
          "numpy": _np_state(np.random.get_state())}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate((st["python"][0], tuple(st["python"][1]), st["python"][2]))
    s = st["numpy"]
    np.random.set_state((s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _py_state(s):
    return [s[0], list(s[1]), s[2]]


def _np_state(s):
    return [s[0], torch.from_numpy(np.asarray(s[1], dtype=np.int64)), int(s[2]), int(s[3]), float(s[4])]


def _is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in (STATE_FILE, "model.safetensors", "config.json"))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def clean_stale(ckpt_root: str) -> None:
    """Remove ``*.tmp*`` leftovers of an interrupted checkpoint write or prune."""
    if not os.path.isdir(ckpt_root):
        return
    for stale in os.listdir(ckpt_root):
        if ".tmp" in stale:
            _remove(os.path.join(ckpt_root, stale))


def save_checkpoint(ckpt_root: str, step: int, model, state: Dict[str, Any], keep: int = 2,
                    model_state: Optional[Dict[str, torch.Tensor]] = None,
                    save_model: Optional[Callable[..., None]] = None) -> str:
    """Write checkpoint ``step`` under ``ckpt_root`` atomically and update ``latest``.

    ``keep``: number of newest checkpoints kept (0 keeps all); ``model_state``: the weights to
    write instead of ``model.state_dict()`` (the gathered full tensors of a sharded model);
    ``save_model(model, folder, state_dict=...)``: writes the model's ``config.json`` +
    ``model.safetensors`` (default: ``model.save_pretrained``, a training task's ``save_model``)."""
    os.makedirs(ckpt_root, exist_ok=True)
    clean_stale(ckpt_root)
    name = f"step_{step:08d}"
    final = os.path.join(ckpt_root, name)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp", dir=ckpt_root)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if save_model is None:
            model.save_pretrained(tmp, state_dict=model_state)
        else:
            save_model(model, tmp, state_dict=model_state)
        torch.save(state, os.path.join(tmp, STATE_FILE))
        fsync_path(os.path.join(tmp, STATE_FILE))
        fsync_path(tmp)
        if os.path.exists(final):  # same step written again: move the old one aside first
            old = final + ".tmp-del"
            os.replace(final, old)
            _remove(old)
        os.replace(tmp, final)
        fsync_path(ckpt_root)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_text(os.path.join(ckpt_root, "latest"), name + "\n")
    _prune(ckpt_root, keep, name)
    return final


def _prune(root: str, keep: int, newest: str) -> None:
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and ".tmp" not in n)
    for old in names[:-keep] if keep > 0 else []:
        if old != newest:
            path = os.path.join(root, old)
            gone = path + ".tmp-del"
            try:
                os.replace(path, gone)  # atomic: the step_ folder vanishes at once
            except OSError:
                continue
            _remove(gone)


def list_checkpoints(ckpt_root: str) -> List[str]:
    """Complete checkpoint folders under ``ckpt_root``, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    names = sorted(n for n in os.listdir(ckpt_root) if n.startswith("step_") and ".tmp" not in n)
    return [os.path.join(ckpt_root, n) for n in names if _is_complete(os.path.join(ckpt_root, n))]


def latest_checkpoint(ckpt_root: str) -> Optional[str]:
    """The checkpoint named by ``latest``; the newest complete one if that is missing; None if none."""
    ptr = os.path.join(ckpt_root, "latest")
    if os.path.isfile(ptr):
        with open(ptr, encoding="utf-8") as f:
            name = f.read().strip()
        path = os.path.join(ckpt_root, name)
        if name and _is_complete(path):
            return path
    found = list_checkpoints(ckpt_root)
    if found:
        return found[-1]
    if os.path.isfile(ptr):
        raise CheckpointError(f"{ptr} names {name!r}, which is incomplete or missing, and no other checkpoint is complete")
    return None


def load_train_state(path: str) -> Dict[str, Any]:
    try:
        return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot read {STATE_FILE} ({e.__class__.__name__}: {e})") from None
