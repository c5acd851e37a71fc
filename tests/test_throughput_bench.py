"""The throughput benchmarks run on CPU with tiny sizes: benchmarks/throughput.py end to end,
benchmarks/train_step.py's analytic FLOPs, and benchmarks/gpu.sh end to end in its ``--dry`` mode
(fp32, tiniest sizes; ``--cpu-smoke`` runs the GPU sizes' bf16 pieces and takes minutes on 2 cores:
docs/performance.md)."""
import importlib.util
import json
import pathlib
import os
import subprocess
import sys


REPO = pathlib.Path(__file__).resolve().parents[1]


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_smoke(tmp_path, capsys):
    bench = load_bench("throughput")
    out = tmp_path / "t.json"
    assert bench.main(["--preset", "qlip-tiny", "--images", "4", "--batch-size", "2", "--rounds", "1",
                       "--workers", "0", "--precisions", "fp32", "bf16", "--device", "cpu",
                       "--source-size", "64", "48", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert [row["precision"] for row in r["rows"]] == ["fp32", "bf16"]
    for row in r["rows"]:
        assert row["model"]["img_per_s"] > 0 and row["e2e w0"]["of_model"] > 0
        assert len(row["model"]["seconds"]) == 1
    assert "ids identical in every mode" in capsys.readouterr().out


def test_train_flops_match_the_tokenize_benchmark_count():
    """The MFU numerator, 3 x forward FLOPs, against benchmarks/tokenizer_speed.py's separate count of the
    image path (checked there against FlopCounterMode) plus the pooled projection and text tower.
    (FlopCounterMode itself agrees exactly once the attention products it cannot see on CPU are
    added: 14.32 MFLOP forward for qlip-tiny, 100.49 GFLOP for B-16; not run here, it takes ~10 s.)"""
    from qlip.model import get_preset
    train, tok = load_bench("train_step"), load_bench("tokenizer_speed")
    for preset in ("qlip-tiny", "qlip-b-16-256"):
        cfg = get_preset(preset)
        t = cfg.text
        text = sum(tok.tower_flops(t, t.context_length)) + 2 * t.width * cfg.embed_dim
        image = tok.analytic_flops(cfg)["total"] + 2 * cfg.vision.width * cfg.embed_dim
        assert train.train_flops_per_image(cfg) == 3 * (image + text)
    assert train.train_flops_per_image(get_preset("qlip-tiny")) == 3 * 14320512
    assert train.peak_tflops("NVIDIA H200", None) == 989.0 and train.peak_tflops("cpu", None) is None
    assert train.peak_tflops("cpu", 2.5) == 2.5


def test_gpu_script_rejects_unknown_options():
    script = REPO / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    p = subprocess.run(["bash", str(script), "--bogus"], capture_output=True, text=True)
    assert p.returncode == 2 and "usage: bash benchmarks/gpu.sh [--cpu-smoke | --dry]" in p.stderr


def test_gpu_script_dry_run(tmp_path):
    """The prepared GPU script, every piece once on CPU: its benchmarks write the JSON its summary
    reads, and the summary has a line per piece (a renamed option or JSON key fails here, not on a
    lent GPU with minutes to spare)."""
    env = dict(os.environ, QLIP_BENCH_OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry"], capture_output=True, text=True,
                       env=env, cwd=str(tmp_path), timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "tokenize-qlip-tiny.json").is_file() and (tmp_path / "train-step.json").is_file()
    summary = p.stdout.split("== summary", 1)[1]
    assert "tokenize qlip-tiny fp32 b2 model img/s" in summary
    assert "tokenize qlip-tiny fp32 b2 e2e w1 img/s" in summary
    assert "train qlip-tiny fp32 b2 ckpt off img/s" in summary and "train qlip-tiny fp32 b2 ckpt on img/s" in summary
    assert "failed" not in summary and "generator train tokens/s" in summary
