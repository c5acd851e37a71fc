"""SIGKILL mid-training + --resume == uninterrupted run; checkpoints are never half-written."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from _train_testutils import REPO, env, max_abs_diff, qlip_cmd, read_log, tiny_recipe, weights, write_recipe

STEPS = 24
CKPT_FILES = {"config.json", "model.safetensors", "train_state.pt"}


@pytest.fixture(scope="module")
def recipe(shapes_dir, tmp_path_factory):
    d = tiny_recipe(shapes_dir, optim={"steps": STEPS})
    return write_recipe(tmp_path_factory.mktemp("recipe") / "stage1.yaml", d)


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory):
    """The uninterrupted run, in-process (same code, one thread: bitwise what the CLI computes)."""
    from qlip.train.recipe import load_recipe
    from qlip.train import train
    out = tmp_path_factory.mktemp("ref") / "run"
    summary = train(load_recipe(recipe), str(out))
    assert summary["steps"] == STEPS
    return out


def _complete_or_gone(path):
    """True if the checkpoint folder is complete, or no longer exists (pruned meanwhile)."""
    try:
        return CKPT_FILES <= set(os.listdir(path))
    except FileNotFoundError:
        return True


def _check_invariants(root):
    """Every visible step_* folder is complete and `latest` names a complete one. Returns latest's step."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return None
    for name in names:
        if name.startswith("step_") and ".tmp" not in name:
            assert _complete_or_gone(os.path.join(root, name)), f"half-written checkpoint visible: {name}"
    try:
        with open(os.path.join(root, "latest"), encoding="utf-8") as f:
            latest = f.read().strip()
    except FileNotFoundError:
        return None
    assert latest.startswith("step_"), f"latest holds {latest!r}"
    assert CKPT_FILES <= set(os.listdir(os.path.join(root, latest))), f"latest -> incomplete {latest}"
    return int(latest[5:])


def _same_as_reference(out, reference):
    diff = max_abs_diff(weights(out / "final"), weights(reference / "final"))
    assert diff <= 1e-6, f"resumed run differs from the uninterrupted one by {diff}"
    # the log of the resumed run is the uninterrupted log: every step once, same losses
    got, want = read_log(out), read_log(reference)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for k in ("loss", "mse", "contrastive", "quant", "grad_norm"):
            assert abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(b[k])), (a["step"], k, a[k], b[k])


_CRASH = """
import os, signal, sys, torch
_save, _n = torch.save, [0]
def _crash(obj, f, *a, **k):
    _n[0] += 1
    if _n[0] == 2:  # die in the middle of writing the 2nd checkpoint (step 4)
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *a, **k)
torch.save = _crash
from qlip.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_training_then_resume_matches_uninterrupted(recipe, reference, tmp_path):
    out = tmp_path / "run"
    root = out / "checkpoints"

    # 1) killed while writing the checkpoint of step 4: step 2 stays the latest, a stale .tmp remains
    p = subprocess.run([sys.executable, "-c", _CRASH, "train", recipe, "--out", str(out)], cwd=REPO, env=env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    names = sorted(os.listdir(root))
    stale = [n for n in names if ".tmp" in n]
    assert stale and all(n.startswith("step_00000004.tmp") for n in stale), names
    assert (root / "latest").read_text().strip() == "step_00000002"
    assert CKPT_FILES <= set(os.listdir(root / "step_00000002"))
    assert not (root / "step_00000004").exists()

    # 2) `python -m qlip train --resume`, SIGKILLed from outside once a later checkpoint exists,
    #    while watching that no half-written checkpoint is ever visible
    proc = subprocess.Popen(qlip_cmd("train", recipe, "--out", out, "--resume"), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at, deadline = None, time.time() + 180
    try:
        while proc.poll() is None and time.time() < deadline:
            step = _check_invariants(root)
            if step is not None and step >= 8:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, f"run ended before a checkpoint at step 8 was seen: {proc.stderr.read()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final").exists() and not (out / "summary.json").exists(), "killed too late"
    last = _check_invariants(root)
    assert last is not None and 8 <= last < STEPS
    # the stale folder of step 1 is gone (this kill may leave its own *.tmp*: cleaned by the next save)
    assert not set(stale) & set(os.listdir(root)), "stale *.tmp not cleaned"

    # 3) resume to the end (in-process, to save a start-up): same weights and log as the uninterrupted run
    from qlip.train.recipe import load_recipe
    from qlip.train import train
    summary = train(load_recipe(recipe), str(out), resume=True)
    assert summary["stopped_by"] == "steps" and summary["steps_this_run"] == STEPS - last
    _same_as_reference(out, reference)
    assert sorted(os.listdir(root)) == ["latest", f"step_{STEPS - 2:08d}", f"step_{STEPS:08d}"]  # keep_ckpts 2


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path):
    import qlip
    from qlip.errors import CheckpointError
    from qlip.train.state import latest_checkpoint, list_checkpoints, load_train_state, save_checkpoint

    torch.manual_seed(0)
    model = qlip.load("qlip-tiny", pretrained=False)
    root = str(tmp_path / "ckpt")
    assert latest_checkpoint(root) is None
    for step in (2, 4, 6):
        save_checkpoint(root, step, model, {"step": step}, keep=2)
    assert [os.path.basename(p) for p in list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    assert os.path.basename(latest_checkpoint(root)) == "step_00000006"
    assert load_train_state(latest_checkpoint(root))["step"] == 6
    save_checkpoint(root, 6, model, {"step": 6, "again": True}, keep=2)  # same step: replaced in place
    assert load_train_state(latest_checkpoint(root))["again"] is True
    # `latest` naming a folder that vanished (kill between two renames): newest complete one
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000008\n")
    assert os.path.basename(latest_checkpoint(root)) == "step_00000006"
    os.remove(os.path.join(root, "step_00000006", "train_state.pt"))
    assert os.path.basename(latest_checkpoint(root)) == "step_00000004"
    for name in ("step_00000004", "step_00000006"):
        os.remove(os.path.join(root, name, "model.safetensors"))
    with pytest.raises(CheckpointError):
        latest_checkpoint(root)
    # stale leftovers (folders and files) are removed by the next save
    os.makedirs(os.path.join(root, "step_00000010.tmpabc"))
    open(os.path.join(root, ".latest.x.tmp"), "w").close()
    save_checkpoint(root, 10, model, {"step": 10}, keep=0)
    assert not [n for n in os.listdir(root) if ".tmp" in n]
