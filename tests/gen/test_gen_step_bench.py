"""benchmarks/gen_step.py: the --smoke run on a CPU writes the JSON benchmarks/gpu.sh summarises,
and its analytic training FLOPs agree with torch's FLOP counter on a real forward pass."""
import importlib.util
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "gen_step.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("gen_step_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_writes_the_json_fields(tmp_path):
    out = tmp_path / "gen-step.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--smoke", "--json", str(out)], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=600)  # ~6 s of CPU
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["smoke"] is True and r["peak_tflops"] is None
    (row,) = r["rows"]
    assert row["preset"] == "gpt-tiny" and row["precision"] == "fp32" and row["batch"] == 4
    assert row["image_tokens"] == 16 and row["seq_len"] == 8 + 16 - 1
    assert row["tokens_per_s"] > 0 and row["step_s"] > 0 and "mfu" not in row  # no known peak on a CPU
    assert abs(row["tokens_per_s"] * row["step_s"] - 4 * 16) < 1e-6 * row["tokens_per_s"]
    assert 15 < row["loss"] < 25  # 28-bit ids, random weights: about ln 2^28 = 19.4 nats
    assert row["images_per_s"] > 0 and row["sample_batch"] == 2 and row["cfg"] == 4.0
    assert r["tokens_per_s"] == row["tokens_per_s"] and r["note"].startswith("gpt-tiny fp32 b4")
    assert "gpt-tiny" in p.stdout  # the table


def test_train_flops_match_the_flop_counter():
    """3 x (every mm / addmm of a real forward pass, as torch counts them) + causal attention
    2 x S^2 x dim per block (SDPA is not counted by the CPU FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from qlip.gen.model import GenConfig, T2IModel
    bench = _load_script()
    for kw in ({}, {"n_kv_heads": 2}):
        cfg = GenConfig.from_preset("gpt-tiny", grid_h=3, grid_w=4, text_len=5, text_dim=24, **kw)
        model = T2IModel(cfg)
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.randn(1, 5, 24), torch.randint(0, 1 << 28, (1, 12)))
        counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
        matmuls = sum(v for k, v in counts.items() if k in ("aten.mm", "aten.addmm", "aten.bmm"))
        S = 5 + 12 - 1
        assert bench.train_flops_per_sequence(cfg) == 3 * (matmuls + 2 * S * S * cfg.dim * cfg.n_layers)
    assert bench.peak_tflops("NVIDIA H200", None) == 989.0 and bench.peak_tflops("cpu", None) is None
