"""benchmarks/loader_cache.py runs end to end and finds the cached loader's batches equal to the plain one's."""
import json
import os
import subprocess
import sys

from qlip.data.shapes import generate_shapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_loader_cache_benchmark_runs(tmp_path):
    generate_shapes(str(tmp_path), n=24, size=64, seed=0, shard_size=8, heldout_n=0, progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "loader_cache.py"), "--data", str(tmp_path),
                        "--batches", "15", "--batch-size", "4", "--cache-mb", "8"],
                       env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["same_batches"] is True and r["batches"] == 15 and r["plain_s"] > 0 and r["cached_s"] > 0
