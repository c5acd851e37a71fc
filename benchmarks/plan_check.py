"""Check `qlip plan`'s cost model against real training steps on this machine's CPU.

For each recipe (default: the demo recipe at batch 16 and QLIP-B-16-256 stage 1 with two blocks
per tower at batch 4) it runs the recipe's real optimizer step (the engine's: zero_grad, the task's
micro-step, backward, gradient clipping, the optimizer, after_step) on synthetic data and compares
with what `qlip plan` predicts from its own measurement (``measure``: batch 2, towers at depth 1
and 2, extrapolated):

* **FLOPs**: the plan's FLOPs per sample x batch against ``FlopCounterMode`` over one whole step
  of the full-depth model at the check's batch (the same counter, so this checks the depth and
  batch extrapolation and that nothing outside the measured micro-step adds matrix work);
* **peak memory**: ``memory_terms`` (weights, optimizer states, inputs, max(backward, optimizer
  step); module docstring of qlip/train/plan.py) against the **measured peak: the most bytes live
  in torch's CPU allocator** from before the model is built to the end of ``--steps`` optimizer
  steps (:class:`qlip.train.memtrace.AllocatorTrace`: the profiler's allocation events; the CPU
  twin of ``torch.cuda.max_memory_allocated``; the steady state, optimizer states allocated, is
  reached in the second step). The growth of the process's peak RSS is printed beside it for
  reference only: it also holds the Python heap, BLAS / oneDNN buffers and freed pages;
* **step time** (reported, not a target): FLOPs of a step / this CPU's fp32 GEMM rate against the
  median CPU time of real steps; the ratio is this CPU's "MFU" for these shapes.

    OMP_NUM_THREADS=1 python benchmarks/plan_check.py            # demo (16) and B-16 (2 blocks, 4)
    python benchmarks/plan_check.py qlip/configs/demo-stage1.yaml --batch 16 --steps 2
    python benchmarks/plan_check.py qlip/configs/qlip-b-16-256-stage1.yaml --batch 4 \
        --set model.overrides.vision.depth=2 model.overrides.decoder.depth=2 model.overrides.text.depth=2

Times are the process's CPU time (``time.process_time``), not wall time: on a shared machine
other processes stretch the wall clock, not the work. The figures of one run go into
docs/scaling.md.
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
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from qlip.train.distributed import clip_grad_norm_  # noqa: E402  (the engine's: float64 sums)
from qlip.train.memtrace import AllocatorTrace  # noqa: E402
from qlip.train.optim import build_optimizer  # noqa: E402
from qlip.train.plan import (_cpu_attention_flops, _NullLog, _synthetic_batch, _variant, build_task,  # noqa: E402
                             count_parameters, measure, memory_terms)
from qlip.train.recipe import Recipe, load_recipe  # noqa: E402

B16_BLOCKS = [f"model.overrides.{t}.depth=2" for t in ("vision", "decoder", "text")]
DEFAULT_CHECKS = [("qlip/configs/demo-stage1.yaml", [], 16),
                  ("qlip/configs/qlip-b-16-256-stage1.yaml", B16_BLOCKS, 4)]
MIB = 2 ** 20


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


class Step:
    """The recipe's task, model, optimizer and a synthetic batch on the CPU (as ``qlip plan``
    measures them: fp32, preset weights), stepped as ``Trainer.run_step`` steps (one micro-batch,
    one process)."""

    def __init__(self, recipe: Recipe, batch: int):
        self.r = _variant(recipe)
        self.task, self.model = build_task(self.r, "cpu")
        self.task.train_mode(self.model)
        groups = self.task.param_groups(self.model)
        self.opt = build_optimizer(groups, self.r.optim)
        self.params = [p for g in groups for p in g["params"]]
        self.data = _synthetic_batch(self.model, self.r, batch)

    def __call__(self, step: int, mark=lambda name: None) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.task.before_step(step)
        mark("backward")
        loss = self.task.micro_step(self.data, 1.0, _NullLog(), step)
        if loss is not None:
            loss.backward()
        del loss
        mark("optimizer")
        clip = self.r.optim.grad_clip
        clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        self.opt.step()
        self.task.after_step(step)


def timed_steps(recipe: Recipe, batch: int, steps: int):
    """Median CPU seconds of ``steps`` optimizer steps (after one warm-up step) and the growth of
    the peak RSS from before the model was built."""
    rss0 = max_rss_bytes()
    run = Step(recipe, batch)
    times = []
    for i in range(steps + 1):
        t = time.process_time()
        run(i)
        times.append(time.process_time() - t)
    return statistics.median(times[1:]), max_rss_bytes() - rss0


def traced_steps(recipe: Recipe, batch: int, steps: int) -> dict:
    """The CPU allocator's peak over ``steps`` optimizer steps, from before the model is built;
    the phases of the last step; then the FLOPs of one more step (``FlopCounterMode``)."""
    with AllocatorTrace() as tr:
        run = Step(recipe, batch)
        for i in range(steps):
            run(i, mark=lambda name, i=i: tr.mark(f"{i}.{name}"))
        tr.mark("end")
    last = steps - 1
    out = {"peak": tr.peak(), "resident": tr.live_at(f"{last}.backward"),
           "backward": tr.peak(f"{last}.backward", f"{last}.optimizer") - tr.live_at(f"{last}.backward"),
           "optimizer": tr.peak(f"{last}.optimizer", "end") - tr.live_at(f"{last}.backward")}
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        run(steps)
    out["flops"] = float(counter.get_total_flops())
    return out


def check(name: str, recipe: Recipe, batch: int, steps: int, plan_batch: int = 2) -> dict:
    step_s, rss = timed_steps(recipe, batch, steps)  # first: the peak RSS must not include the others
    traced = traced_steps(recipe, batch, max(steps, 2))
    params = count_parameters(recipe)
    m = measure(recipe, batch=plan_batch)
    mem = memory_terms(_variant(recipe), m, params, batch=batch)  # CPU: fp32, single-tensor update, no overhead
    gemm = matmul_flops(max(256, max(w for w in _widths(recipe))))
    flops = m.flops_per_sample * batch
    return {"recipe": name, "batch": batch, "plan_batch": plan_batch, "threads": torch.get_num_threads(),
            "flops_plan": flops, "flops_measured": traced["flops"], "ratio_flops": flops / traced["flops"],
            "memory_plan_mib": mem["total"] / MIB, "memory_measured_mib": traced["peak"] / MIB,
            "ratio_memory": mem["total"] / traced["peak"],
            "plan_terms_mib": {k: (v if k == "peak_phase" else v / MIB) for k, v in mem.items()},
            "measured_phases_mib": {k: traced[k] / MIB for k in ("resident", "backward", "optimizer")},
            "rss_growth_mib": rss / MIB, "cpu_gemm_flops": gemm, "predicted_step_s": flops / gemm,
            "measured_step_s": step_s, "ratio_step": flops / gemm / step_s}


def _widths(recipe: Recipe):
    _, model = build_task(_variant(recipe), "meta")
    c = model.config
    return [c.vision.width, c.decoder.width] + ([c.text.width] if model.text is not None else [])


def report(x: dict) -> str:
    t, ph = x["plan_terms_mib"], x["measured_phases_mib"]
    resident = t["weights"] + t["optimizer_states"] + t["inputs"]
    return "\n".join([
        f"{x['recipe']}: batch {x['batch']} (plan measured at batch {x['plan_batch']}), {x['threads']} thread(s)",
        f"  FLOPs / step     plan {x['flops_plan'] / 1e9:10.3f} G   measured {x['flops_measured'] / 1e9:10.3f} G   "
        f"plan / measured {x['ratio_flops']:.3f}",
        f"  peak memory      plan {x['memory_plan_mib']:10.1f} MiB measured {x['memory_measured_mib']:10.1f} MiB "
        f"plan / measured {x['ratio_memory']:.3f}   (peak RSS growth {x['rss_growth_mib']:.0f} MiB, reference)",
        f"    resident       plan {resident:10.1f} MiB measured {ph['resident']:10.1f} MiB  (weights {t['weights']:.1f}"
        f" + optimizer states {t['optimizer_states']:.1f} + inputs {t['inputs']:.1f})",
        f"    backward       plan {t['backward']:10.1f} MiB measured {ph['backward']:10.1f} MiB  (activations "
        f"{t['activations']:.1f} + overlap {t['backward_overlap']:.1f})",
        f"    optimizer step plan {t['optimizer']:10.1f} MiB measured {ph['optimizer']:10.1f} MiB  (gradients "
        f"{t['gradients']:.1f} + transient {t['optimizer_transient']:.1f})",
        f"  step time        plan {x['predicted_step_s']:10.3f} s   measured {x['measured_step_s']:10.3f} s   "
        f"plan / measured {x['ratio_step']:.2f} (CPU GEMM {x['cpu_gemm_flops'] / 1e9:.1f} GFLOP/s; not a target)",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipes", nargs="*", help="recipes (default: the demo recipe at batch 16 and QLIP-B-16-256 "
                                               "stage 1 with two blocks per tower at batch 4)")
    ap.add_argument("--batch", type=int, help="samples per step (default: 16 for the demo, 4 for B-16)")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps traced and timed (>= 2 traced)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="recipe overrides for the given recipes, e.g. model.overrides.vision.depth=1")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    todo = [(p, args.set, args.batch or 16) for p in args.recipes] or \
        [(p, sets, args.batch or b) for p, sets, b in DEFAULT_CHECKS]
    results = []
    for path, sets, batch in todo:
        x = check(path + "".join(f" {o}" for o in sets), load_recipe(path, sets), batch, args.steps)
        print(report(x), flush=True)
        results.append(x)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
