"""Check `qlip plan`'s cost model against real training steps on this machine's CPU.

For each recipe: FLOPs per sample as `qlip plan` measures them (FlopCounterMode, depth
extrapolation), this CPU's matmul rate (fp32 GEMMs of the model's width), the predicted step time
(FLOPs of a step / matmul rate), the measured step time (median of real optimizer steps of the
recipe's task: forward, backward, optimizer step), and the predicted and measured memory
(weights + gradients + optimizer states + activations vs the growth of the peak RSS).

    OMP_NUM_THREADS=1 python benchmarks/plan_check.py                 # demo and tiny recipes
    python benchmarks/plan_check.py qlip/configs/demo-stage1.yaml --batch 16 --steps 5 --threads 2
    python benchmarks/plan_check.py qlip/configs/qlip-b-16-256-stage1.yaml --batch 2 --steps 2 \
        --set model.overrides.vision.depth=1 model.overrides.decoder.depth=1 model.overrides.text.depth=1

Times are the process's CPU time (``time.process_time``), not wall time: on a shared machine
other processes stretch the wall clock, not the work. With one thread (the default) CPU time is
the compute time. The ratio predicted / measured step time is this CPU's "MFU" against its own
GEMM rate; the figures of one run go into docs/scaling.md.
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # keep benchmarks/ off sys.path

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from qlip.train.optim import build_optimizer  # noqa: E402
from qlip.train.plan import _NullLog, _synthetic_batch, _variant, build_task, count_parameters, measure  # noqa: E402
from qlip.train.recipe import Recipe, load_recipe  # noqa: E402

TINY = {"model": {"preset": "qlip-tiny"}, "optim": {"optimizer": "adamw", "steps": 10, "warmup_steps": 1},
        "data": {"batch_size": 16}}


def matmul_flops(n: int, seconds: float = 1.0) -> float:
    """fp32 FLOP/s of (n x n) @ (n x n) on this CPU (best of repeated runs over ``seconds`` of
    CPU time)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, end = float("inf"), time.process_time() + seconds
    while time.process_time() < end:
        t = time.process_time()
        a @ b
        best = min(best, time.process_time() - t)
    return 2 * n ** 3 / best


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measured_step(recipe: Recipe, batch: int, steps: int):
    """Median CPU seconds of real optimizer steps of the recipe's task on the CPU, and the growth of
    the peak RSS from before the model was built."""
    r = _variant(recipe)
    rss0 = max_rss_bytes()
    task, model = build_task(r, "cpu")
    task.train_mode(model)
    opt = build_optimizer(task.param_groups(model), r.optim)
    data = _synthetic_batch(model, r, batch)
    times = []
    for step in range(steps + 1):
        t = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = task.micro_step(data, 1.0, _NullLog(), step)
        if loss is not None:
            loss.backward()
        opt.step()
        times.append(time.process_time() - t)
    return statistics.median(times[1:]), max_rss_bytes() - rss0


def check(name: str, recipe: Recipe, batch: int, steps: int) -> dict:
    step_s, rss = measured_step(recipe, batch, steps)  # first: the peak RSS must not include the others
    params = count_parameters(recipe)
    m = measure(recipe, batch=2)
    gemm = matmul_flops(max(256, max(w for w in _widths(recipe))))
    pred_s = m.flops_per_sample * batch / gemm
    pred_mem = 4 * params["total"] + 12 * params["trainable"] + m.activation_bytes_per_sample * batch
    return {"recipe": name, "batch": batch, "flops_per_sample": m.flops_per_sample,
            "cpu_gemm_flops": gemm, "predicted_step_s": pred_s, "measured_step_s": step_s,
            "ratio_step": pred_s / step_s, "predicted_memory_mb": pred_mem / 2 ** 20,
            "measured_rss_growth_mb": rss / 2 ** 20, "ratio_memory": pred_mem / rss if rss else None,
            "threads": torch.get_num_threads()}


def _widths(recipe: Recipe):
    _, model = build_task(_variant(recipe), "meta")
    c = model.config
    return [c.vision.width, c.decoder.width] + ([c.text.width] if model.text is not None else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", help="recipes (default: qlip/configs/demo-stage1.yaml and qlip-tiny)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for every recipe, e.g. model.overrides.vision.depth=1")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    todo = [(p + "".join(f" {o}" for o in args.set), load_recipe(p, args.set)) for p in args.recipes] or [
        ("qlip-tiny (stage 1)", Recipe.from_dict(TINY)), ("qlip/configs/demo-stage1.yaml", load_recipe("qlip/configs/demo-stage1.yaml"))]
    results = [check(name, r, args.batch, args.steps) for name, r in todo]
    for x in results:
        print(f"{x['recipe']}: batch {x['batch']}, {x['flops_per_sample'] / 1e9:.3f} GFLOP/sample, CPU GEMM "
              f"{x['cpu_gemm_flops'] / 1e9:.1f} GFLOP/s ({x['threads']} thread(s)); step predicted "
              f"{x['predicted_step_s']:.3f} s, measured {x['measured_step_s']:.3f} s, ratio {x['ratio_step']:.2f}; "
              f"memory predicted {x['predicted_memory_mb']:.0f} MB, peak RSS growth {x['measured_rss_growth_mb']:.0f} MB"
              + (f", ratio {x['ratio_memory']:.2f}" if x["ratio_memory"] else ""))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
