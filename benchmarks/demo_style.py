"""Does training on the widened shapes style make the demo learn shapes rather than one renderer's
pixels? (docs/demo.md, "Seventh round"; issue 15's "the demo learns shapes").

    # after `qlip demo` (its models in runs/demo): wide-style data, the demo's stage-1 recipe on it as
    # CLIP-only and as QLIP stage 1 (two processes, one thread each; ~12 min on a 2-core AMD EPYC),
    # then every model evaluated
    python benchmarks/demo_style.py --demo-dir runs/demo --out runs/wide

    # half the demo's plain shards, half wide ones (from the run above)
    python benchmarks/demo_style.py --demo-dir runs/demo --out runs/mix --style mixed --wide-data runs/wide/data

    # evaluate finished models only (no data, no training)
    python benchmarks/demo_style.py --demo-dir runs/demo --out runs/wide --eval-only

The choice (plain or wide training images) is made on **validation**: the plain validation split
(320 images) and the second renderer (``qlip.eval.shapes_alt``) with seed 1; the demo's reported
figures are the plain test split (640) and the second renderer with seed 0, printed beside them
once. Each model prints one JSON line (zero-shot top-1, colour and kind accuracy as fractions) and
``OUT/style.json`` holds them all. The baselines are the demo's own models trained on plain images
with the same recipe: ``DEMO_DIR/clip_only/final`` and ``DEMO_DIR/qlip_stage1/final``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

# keep benchmarks/ off sys.path (its scripts are not modules of this program)
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "qlip", "configs", "demo-stage1.yaml")
# the two trainings: the demo's stage-1 recipe, and its CLIP-only baseline (as `qlip demo` derives it)
RUNS = {"clip_only": ["loss.alpha_r=0", "loss.alpha_q=0"], "qlip_stage1": []}


def make_data(out: str, style: str, n: int, workers: int, heldout: int = 640, val: int = 320) -> str:
    """The demo's data settings (10,240 training images in shards of 512, 320 validation and 640
    test images) with training images of ``style``; validation and test stay plain."""
    data = os.path.join(out, "data")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        subprocess.run(["qlip", "data", "shapes", data, "--n", str(n), "--heldout", str(heldout), "--val", str(val),
                        "--shard-size", "512", "--workers", str(workers), "--style", style, "--quiet"], check=True)
    return data


def mixed_data(out: str, demo_data: str, wide_data: str) -> str:
    """Half the shards plain (the demo's own, the first half), half wide (the second half of a wide
    run with the same seed: the same scenes restyled, so the halves show different scenes); the
    plain validation and test shards. Symbolic links, nothing copied."""
    import glob
    data = os.path.join(out, "data")
    os.makedirs(data, exist_ok=True)
    plain = sorted(glob.glob(os.path.join(demo_data, "shapes-train-*.tar")))
    wide = sorted(glob.glob(os.path.join(wide_data, "shapes-train-*.tar")))
    if not plain or len(plain) != len(wide):
        raise SystemExit(f"--style mixed needs the same number of training shards in {demo_data} ({len(plain)}) "
                         f"and {wide_data} ({len(wide)}): run `qlip demo` with the default data first")
    half = len(plain) // 2
    chosen = plain[:half] + wide[half:] + sorted(glob.glob(os.path.join(demo_data, "shapes-val-*.tar"))) \
        + sorted(glob.glob(os.path.join(demo_data, "shapes-heldout-*.tar")))
    for src in chosen:
        dst = os.path.join(data, os.path.basename(src))
        if not os.path.lexists(dst):
            os.symlink(os.path.relpath(src, data), dst)
    return data


def train(out: str, data: str, steps: int, extra: List[str]) -> None:
    """Both trainings at once, one process and one thread each; a rerun resumes finished or
    interrupted ones from their checkpoints."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    procs = []
    for name, over in RUNS.items():
        run = os.path.join(out, name)
        if os.path.exists(os.path.join(run, "final", "config.json")):
            continue
        cmd = ["qlip", "train", RECIPE, f"data.train={data}/shapes-train-*.tar", f"optim.steps={steps}",
               "train.tensorboard=false", "train.progress=false", *over, *extra, "--out", run]
        if os.path.isdir(os.path.join(run, "checkpoints")):
            cmd.append("--resume")
        log = open(os.path.join(out, f"{name}.log"), "a")
        procs.append((name, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
    for name, p in procs:
        if p.wait() != 0:
            raise SystemExit(f"training {name} failed (exit {p.returncode}): see {out}/{name}.log")


def evaluate(model_dir: str, data: str, alt_n: int) -> Dict[str, Dict[str, float]]:
    """Zero-shot on the plain validation / test splits and on the second renderer (seeds 1 and 0)."""
    import glob

    from qlip.demo.qlip import evaluate as demo_evaluate
    from qlip.eval.shapes_alt import evaluate_alt
    from qlip.io import load
    model = load(model_dir)
    keys = ("zero_shot_top1", "colour_acc", "kind_acc")
    out: Dict[str, Dict[str, float]] = {}
    for split, pattern in (("validation", "shapes-val-*.tar"), ("test", "shapes-heldout-*.tar")):
        if not glob.glob(os.path.join(data, pattern)):
            raise SystemExit(f"no {split} shards {data}/{pattern}")
        ev = demo_evaluate(model, os.path.join(data, pattern), keep=1)
        out[split] = {k: round(ev[k], 4) for k in keys}
    for split, seed in (("alt_validation", 1), ("alt_test", 0)):
        r = evaluate_alt(model, n=alt_n, seed=seed, judge=False)
        out[split] = {k: round(r[k], 4) for k in keys}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", default="runs/demo", help="a finished `qlip demo` (its plain-style baselines)")
    ap.add_argument("--out", default="runs/wide")
    ap.add_argument("--style", default="wide", choices=("plain", "wide", "mixed"),
                    help="training images: wide, plain, or mixed (half the demo's plain shards, half wide ones "
                         "from --wide-data or generated into OUT/wide/data)")
    ap.add_argument("--wide-data", default=None, help="--style mixed: an existing wide-style data folder")
    ap.add_argument("--n", type=int, default=10240, help="training images")
    ap.add_argument("--heldout", type=int, default=640, help="plain test images (the demo's: 640)")
    ap.add_argument("--val", type=int, default=320, help="plain validation images (the demo's: 320)")
    ap.add_argument("--steps", type=int, default=1000, help="training steps (the demo's stage 1: 1000)")
    ap.add_argument("--alt-n", type=int, default=320, help="second-renderer images per seed")
    ap.add_argument("--workers", type=int, default=2, help="data rendering processes")
    ap.add_argument("--eval-only", action="store_true", help="evaluate finished models; no data, no training")
    ap.add_argument("overrides", nargs="*", help="recipe overrides for both trainings (section.key=value)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.eval_only:
        data = os.path.join(a.out, "data")
    elif a.style == "mixed":
        wide = a.wide_data or make_data(os.path.join(a.out, "wide"), "wide", a.n, a.workers, a.heldout, a.val)
        data = mixed_data(a.out, os.path.join(a.demo_dir, "data"), wide)
    else:
        data = make_data(a.out, a.style, a.n, a.workers, a.heldout, a.val)
    if not a.eval_only:
        train(a.out, data, a.steps, a.overrides)
    models = {f"{name} ({a.style})": os.path.join(a.out, name, "final") for name in RUNS}
    models.update({f"{name} (plain, {a.demo_dir})": os.path.join(a.demo_dir, name, "final") for name in RUNS})
    rows = []
    for label, path in models.items():
        if not os.path.exists(os.path.join(path, "config.json")):
            print(f"[demo_style] {label}: no model at {path}, skipped", flush=True)
            continue
        row = {"model": label, "path": path, **evaluate(path, data, a.alt_n)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(os.path.join(a.out, "style.json"), "w") as f:
        json.dump({"settings": vars(a), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
