"""benchmarks/demo_style.py on tiny data: wide-style data is made, both trainings run through
`qlip train`, every model is evaluated on the four splits, and a missing baseline is reported."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_demo_style_benchmark(tmp_path):
    out = tmp_path / "wide"
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "demo_style.py"), "--demo-dir", str(tmp_path / "none"),
           "--out", str(out), "--n", "64", "--heldout", "32", "--val", "32", "--steps", "2", "--alt-n", "8",
           "--workers", "1", "data.batch_size=8", "train.log_every=1", "train.ckpt_every=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["style"] == "wide" and manifest["n"] == 64
    rows = json.loads((out / "style.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["clip_only (wide)", "qlip_stage1 (wide)"]
    for r in rows:
        for split in ("validation", "test", "alt_validation", "alt_test"):
            assert set(r[split]) == {"zero_shot_top1", "colour_acc", "kind_acc"}
            assert all(0.0 <= v <= 1.0 for v in r[split].values())
    for name in ("clip_only", "qlip_stage1"):
        steps = [json.loads(line)["step"] for line in (out / name / "log.jsonl").read_text().splitlines()]
        assert steps[-1] == 2
    assert "no model at" in res.stdout  # the plain baselines of a missing demo are named, not invented
    # a rerun reuses the finished trainings and the data: same rows
    res2 = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res2.returncode == 0
    assert json.loads((out / "style.json").read_text())["rows"] == rows
