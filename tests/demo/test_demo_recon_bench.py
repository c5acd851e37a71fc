"""benchmarks/demo_recon.py's stage-1 modes on tiny data: a model judged as it is (--judge-only),
and a stage-1 recipe trained from scratch with overrides (no --stage1); each writes its figures."""
import json
import os
import subprocess
import sys

import pytest

from qlip.data.shapes import generate_shapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks", "demo_recon.py")
FIGURES = ("psnr", "ssim", "judge_colour", "judge_kind", "distinct_codes", "n", "zero_shot_top1", "kind_acc")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("recon") / "data"
    generate_shapes(str(d), n=16, size=64, seed=0, heldout_n=4, val_n=6, shard_size=16, progress=False, workers=1)
    return str(d)


def _run(args):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, BENCH, *args], env=env, capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_scratch_then_judge_only(data, tmp_path):
    out = _run(["--data", data, "--recipe", "qlip/configs/demo-stage1.yaml", "--out", str(tmp_path / "s"),
                "optim.steps=2", "data.batch_size=4", "optim.warmup_steps=1", "train.ckpt_every=0",
                "train.progress=false", "loss.alpha_r=4"])
    assert out["overrides"][-1] == "loss.alpha_r=4" and out["head"] == "the recipe's"
    assert set(FIGURES) <= set(out["final"]) and out["final"]["n"] == 6  # the validation split
    assert 0.0 <= out["final"]["zero_shot_top1"] <= 1.0 and 0.0 <= out["final"]["judge_kind"] <= 1.0
    model = str(tmp_path / "s" / "run" / "final")
    again = _run(["--stage1", model, "--data", data, "--out", str(tmp_path / "j"), "--judge-only"])
    assert again["model"] == model and again["final"] == out["final"]  # the same model, judged the same
    assert json.loads((tmp_path / "j" / "result.json").read_text()) == again
    test = _run(["--stage1", model, "--data", data, "--out", str(tmp_path / "t"), "--judge-only", "--split", "test"])
    assert test["split"] == "test" and test["final"]["n"] == 4  # the held-out split, not validation's 6


def test_scratch_needs_data(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, BENCH, "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "without --stage1" in p.stderr


def test_test_split_only_for_a_model_judged_as_it_is(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, BENCH, "--stage1", "x", "--out", str(tmp_path / "x"), "--split", "test"],
                       env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "use it with --judge-only" in p.stderr
