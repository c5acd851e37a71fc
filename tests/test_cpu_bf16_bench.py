"""benchmarks/cpu_bf16.py --quick runs end to end and writes every measurement it prints."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "b.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "cpu_bf16.py"), "--quick", "--json", str(out)],
                       env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["auto"].split()[0] in ("fp32", "bf16") and r["threads"] == 1
    assert r["matmul"]["n"] == 512 and r["matmul"]["fp32_gflops"] > 0 and r["matmul"]["bf16_gflops"] > 0
    assert r["attention"][0]["shape"] == [8, 4, 80, 64]
    assert r["attention"][0]["bf16_kernel_ms"] > 0 and r["attention"][0]["fp32_upcast_ms"] > 0
    g = r["generator_step"]
    assert g["batch"] == 8 and min(g["fp32_s"], g["bf16_s"], g["bf16_attention_kernel_s"]) > 0
    assert "qlip_steps" not in r  # --quick leaves the QLIP demo steps out
    assert "t2i generator step (batch 8)" in p.stdout and "bf16/fp32" in p.stdout
