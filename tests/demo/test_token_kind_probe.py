"""benchmarks/token_kind_probe.py: the probes read labels the way the demo writes them (captions for
the training tokens, ``colour * 4 + kind`` for the test file) and learn a signal that is there."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BITS, GRID = 8, (2, 2)


def _bench():
    spec = importlib.util.spec_from_file_location("token_kind_probe", os.path.join(REPO, "benchmarks", "token_kind_probe.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ids(colour: int, kind: int) -> np.ndarray:
    """Every token of the 'image' carries its class in its bits (kind: low 2 bits, colour: next 3)."""
    return np.full(GRID[0] * GRID[1], kind | (colour << 2), dtype=np.int32)


def _write(tmp_path, n_train: int = 96, n_test: int = 24):
    from qlip.data import tokens as T
    from qlip.data.shapes import COLOR_NAMES, KINDS
    rng = np.random.default_rng(0)
    folder = tmp_path / "tokens"
    os.makedirs(folder)
    cls = rng.integers(0, len(COLOR_NAMES) * len(KINDS), n_train)
    rows = np.stack([_ids(c // len(KINDS), c % len(KINDS)) for c in cls])
    caps = [f"a photo of a {COLOR_NAMES[c // len(KINDS)]} {KINDS[c % len(KINDS)]} on the left" for c in cls]
    cfg = {"format": T.FORMAT, "version": T.FORMAT_VERSION, "model": {"name": "fake"}, "bits": BITS,
           "grid": list(GRID), "dtype": "int32", "preprocess": {}, "sources": ["fake-000"], "fingerprint": "fake"}
    with open(folder / T.CONFIG, "w") as f:
        json.dump(cfg, f)
    T.write_part(str(folder), 0, cfg, rows, [str(i) for i in range(n_train)], caps, {})
    T.build_index(str(folder))
    labels = torch.arange(n_test) % (len(COLOR_NAMES) * len(KINDS))
    ids = torch.stack([torch.from_numpy(_ids(int(y) // len(KINDS), int(y) % len(KINDS)).astype(np.int64)).view(*GRID)
                       for y in labels])
    images = torch.rand(n_test, 3, 16, 16)
    torch.save({"ids": ids, "labels": labels, "originals": images, "recon": images.clone()}, tmp_path / "test.pt")
    return str(folder), str(tmp_path / "test.pt")


def test_bits_are_the_ids_bits():
    b = _bench()._bits(torch.tensor([[[5, 0]]]), 4)  # 5 = 0b0101, MSB first as qlip.quant.bsq
    assert b.shape == (1, 4, 1, 2)
    assert b[0, :, 0, 0].tolist() == [-1, 1, -1, 1] and b[0, :, 0, 1].tolist() == [-1, -1, -1, -1]


def test_probe_reads_a_class_that_the_tokens_carry(tmp_path):
    tokens, test = _write(tmp_path)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "token_kind_probe.py"), "--tokens", tokens, "--test", test,
           "--steps", "300", "--image-steps", "2", "--image-train", "16"]
    p = subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True)
    out = {r["probe"]: r for r in map(json.loads, p.stdout.strip().splitlines())}
    assert set(out) == {"tokens", "originals", "reconstructions"}
    assert out["tokens"]["train_n"] == 96 and out["tokens"]["test_n"] == 24
    assert out["tokens"]["kind_acc"] == 1.0 and out["tokens"]["colour_acc"] == 1.0
    for name in ("originals", "reconstructions"):  # random pixels: the probes run, and score in [0, 1]
        assert out[name]["train_n"] == 16 and out[name]["test_n"] == 8
        assert 0.0 <= out[name]["kind_acc"] <= 1.0
