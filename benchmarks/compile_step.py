#!/usr/bin/env python
"""Does ``torch.compile`` speed up the stage-1 training step? Eager vs compiled, in one run.

    python benchmarks/compile_step.py                          # qlip-tiny, batch 16, CPU: ~3 min
    python benchmarks/compile_step.py --preset qlip-b-16-256 --batch 64 --device cuda --precision bf16

Two engines (the real ``Engine`` of benchmarks/train_step.py, on one synthetic batch), same seed:
one eager, one whose transformer blocks (the task's ``fsdp_units``: every block of the vision,
text and decoder towers) are compiled with ``nn.Module.compile()``, i.e. what a ``train.compile:
true`` recipe option would do (docs/performance.md). The QLIP task calls ``model.image_pass`` and
``model.encode_text``, not ``model(...)``, so compiling the top-level module would compile nothing
the step runs; per-block ("regional") compilation compiles one block graph and reuses it.
Prints the time of the first compiled step (compilation included), the median step times and
their ratio, and the losses of both after the same steps.
"""
from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402


def _train_step_module():
    spec = importlib.util.spec_from_file_location("qlip_bench_train_step", os.path.join(_HERE, "train_step.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build(a, tmp, batch):
    from qlip.train import Engine, Recipe
    ts = _train_step_module()
    recipe = Recipe.from_dict({
        "model": {"preset": a.preset},
        "optim": {"optimizer": "lamb", "lr": 1e-4, "warmup_steps": 0, "steps": 10 ** 6},
        "loss": {"alpha_r": 1.0, "alpha_q": 1.0, "alpha_a": 1.0},
        "train": {"precision": a.precision, "progress": False, "tensorboard": False, "device": a.device},
    })
    torch.manual_seed(0)
    tr = Engine(recipe, tmp, loader=ts.SyntheticBatches(batch))
    tr.task.train_mode(tr.model)
    return tr, iter(ts.SyntheticBatches({k: v.to(tr.device) for k, v in batch.items()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qlip-tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6, help="timed steps of each engine (after the first)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    from qlip.model import get_preset
    ts = _train_step_module()
    batch = ts.make_batch(get_preset(a.preset), a.batch)
    sync = (lambda: torch.cuda.synchronize()) if a.device.startswith("cuda") else (lambda: None)
    res = {}
    with tempfile.TemporaryDirectory() as t1, tempfile.TemporaryDirectory() as t2:
        for name, tmp in (("eager", t1), ("compiled", t2)):
            tr, batches = build(a, tmp, batch)
            if name == "compiled":
                for unit in tr.task.fsdp_units(tr.model):
                    unit.compile()
            times, logs = [], None
            for i in range(a.steps + 1):
                sync()
                t = time.perf_counter()
                logs = tr.run_step(batches)
                sync()
                times.append(time.perf_counter() - t)
            res[name] = {"first": times[0], "median": statistics.median(times[1:]), "logs": logs}
    e, c = res["eager"], res["compiled"]
    print(f"{a.preset}, batch {a.batch}, {a.precision}, {a.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"eager:    first step {e['first']:.2f} s, median step {e['median']:.3f} s")
    print(f"compiled: first step {c['first']:.2f} s (compilation included), median step {c['median']:.3f} s")
    print(f"compiled / eager step time: {c['median'] / e['median']:.2f}x "
          f"(speed-up {e['median'] / c['median']:.2f}x); compile overhead ~{c['first'] - e['first']:.1f} s")
    le, lc = e["logs"], c["logs"]
    keys = [k for k in ("loss", "loss/total", "total") if isinstance(le, dict) and k in le]
    if keys:
        print(f"{keys[0]} after {a.steps + 1} steps: eager {float(le[keys[0]]):.6f}, compiled {float(lc[keys[0]]):.6f}")
    else:
        print(f"last logs: eager {le}\n           compiled {lc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
