"""Why `qlip demo` trains in two lanes: two 1-thread processes vs one 2-thread process.

Trains two of the demo's stage-1 runs (default: QLIP stage 1 and the reconstruction-only
baseline, the demo's two heaviest) for ``--steps`` steps each, on shapes data generated into a
temporary folder (or ``--data``):

* sequential: one after the other, each with ``--threads`` torch threads (default 2);
* lanes: both at once, each with ``--threads // 2`` threads (what ``qlip demo --lanes 2`` does).

Times are the trainers' own ``elapsed_s`` (training loop only, start-up excluded). Prints, for
every run, seconds per step both ways and the work per core (core-seconds per step, sequential
/ lanes: > 1 means a 1-thread lane uses a core better), and the ratio sequential / lanes of the
wall time for both runs (meaningful for a balanced pair such as the default; with an unbalanced
pair the shorter lane idles at the end). All measured in the same invocation; run it on an
otherwise idle machine.

    python benchmarks/demo_lanes.py                      # 60 steps each, about 2 minutes on 2 cores
    python benchmarks/demo_lanes.py --steps 100 --pair qlip,clip_only
"""
from __future__ import annotations

import os
import sys

# keep benchmarks/ off sys.path (its scripts are not modules of this program)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from importlib import resources  # noqa: E402

RUNS = {  # the demo's stage-1 runs (qlip/demo/qlip.py): recipe overrides
    "qlip": [],
    "clip_only": ["loss.alpha_r=0", "loss.alpha_q=0", "loss.alpha_z=0"],
    "recon_only": ["loss.alpha_a=0", "model.drop_text=true"],
}


def _start(name: str, data: str, steps: int, threads: int, out: str) -> subprocess.Popen:
    recipe = str(resources.files("qlip") / "configs" / "demo-stage1.yaml")
    cmd = [sys.executable, "-m", "qlip", "train", recipe, f"data.train={data}", f"optim.steps={steps}",
           "train.ckpt_every=0", "train.progress=false", "train.tensorboard=false", *RUNS[name],
           "--out", os.path.join(out, name)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _elapsed(proc: subprocess.Popen, out: str, name: str) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{err[-2000:]}")
    with open(os.path.join(out, name, "summary.json"), encoding="utf-8") as f:
        return float(json.load(f)["elapsed_s"])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2, help="threads of the sequential runs (lanes get half)")
    ap.add_argument("--pair", default="qlip,recon_only", help=f"two of {', '.join(RUNS)}")
    ap.add_argument("--data", help="training shards (glob); default: 2,048 generated shapes images")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    pair = a.pair.split(",")
    if len(pair) != 2 or any(p not in RUNS for p in pair):
        raise SystemExit(f"--pair needs two of {', '.join(RUNS)}, got {a.pair!r}")
    lane_threads = max(1, a.threads // 2)
    with tempfile.TemporaryDirectory() as tmp:
        data = a.data
        if not data:
            from qlip.data.shapes import generate_shapes
            generate_shapes(os.path.join(tmp, "data"), n=2048, size=64, seed=0, heldout_n=0, shard_size=512,
                            progress=False, workers=os.cpu_count() or 1)
            data = os.path.join(tmp, "data", "shapes-train-*.tar")
        seq = {}
        for name in pair:
            out = os.path.join(tmp, "seq")
            seq[name] = _elapsed(_start(name, data, a.steps, a.threads, out), out, name)
        out = os.path.join(tmp, "lanes")
        procs = {name: _start(name, data, a.steps, lane_threads, out) for name in pair}
        lanes = {name: _elapsed(p, out, name) for name, p in procs.items()}
    wall_seq, wall_lanes = sum(seq.values()), max(lanes.values())
    print(f"{'run':<12} {'sequential s/step':>18} {'lanes s/step':>13} {'work per core':>14}   ({a.steps} steps, "
          f"{a.threads} threads sequential, {lane_threads} per lane)")
    per_core = {name: (seq[name] * a.threads) / (lanes[name] * lane_threads) for name in pair}
    for name in pair:
        print(f"{name:<12} {seq[name] / a.steps:>18.3f} {lanes[name] / a.steps:>13.3f} {per_core[name]:>13.2f}x")
    print(f"wall for both: sequential {wall_seq:.1f} s, lanes {wall_lanes:.1f} s -> "
          f"lanes are {wall_seq / wall_lanes:.2f}x the sequential throughput")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"steps": a.steps, "sequential_s": seq, "lanes_s": lanes, "work_per_core": per_core,
                       "speedup": wall_seq / wall_lanes}, f, indent=2)


if __name__ == "__main__":
    main()
