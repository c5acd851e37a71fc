"""Helpers shared by tests/train (tiny recipes, CLI subprocesses, weight comparison)."""
import copy
import json
import os
import pathlib
import subprocess
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_recipe(shapes_dir, **sections):
    """A stage-1 recipe of the qlip-tiny preset on the test shards; ``sections`` update it."""
    d = {
        "model": {"preset": "qlip-tiny"},
        "data": {"train": str(pathlib.Path(shapes_dir) / "shapes-train-*.tar"), "batch_size": 8,
                 "shuffle_buffer": 16},
        "optim": {"optimizer": "lamb", "lr": "2e-3", "warmup_steps": 2, "steps": 6},
        "loss": {},
        "train": {"log_every": 1, "ckpt_every": 2, "keep_ckpts": 2, "progress": False, "tensorboard": False,
                  "seed": 0},
    }
    d = copy.deepcopy(d)
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    return d


def write_recipe(path, d):
    path = pathlib.Path(path)
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(path)


def env(**extra):
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""))
    e.update(extra)
    return e


def qlip_cmd(*args):
    return [sys.executable, "-m", "qlip", *map(str, args)]


def run(cmd, timeout=240, **kw):
    p = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def weights(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def max_abs_diff(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


class ListLoader:
    """The trainer's loader interface over a list of batches (cycled); resumable."""

    def __init__(self, batches):
        self.batches, self.pos, self.stats = batches, 0, {"skipped": 0}

    def __iter__(self):
        while True:
            b = self.batches[self.pos % len(self.batches)]
            self.pos += 1
            yield b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = (state[0] if isinstance(state, list) else state)["pos"]


FSDP_REFUSAL = "train.fsdp on CPU ranks needs torch >= 2.9"


def launch_fsdp(cmd, environ=None, timeout=300) -> bool:
    """Run a two-rank ``train.fsdp`` command on CPU ranks. With a torch whose FSDP2 shards CPU
    ranks like one process (>= 2.9) it must succeed: True, the caller compares the runs. Before
    (qlip.compat.FSDP_ON_CPU) it must stop with the engine's one-line refusal: False, nothing to
    compare (run on torch 2.4.1; docs/training.md "Torch versions")."""
    from qlip.compat import FSDP_ON_CPU
    p = subprocess.run(cmd, cwd=REPO, env=environ or env(), capture_output=True, text=True, timeout=timeout)
    if FSDP_ON_CPU:
        assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        return True
    assert p.returncode != 0 and FSDP_REFUSAL in p.stderr, p.stderr[-3000:]
    return False
