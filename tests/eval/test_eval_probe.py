"""Linear probe on synthetic features."""
import numpy as np
import pytest

from qlip.errors import DataError, QLIPError
from qlip.eval.linear_probe import fit_probe, select_position


def _blobs(n, d=12, c=4, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * 4
    y = rng.integers(0, c, size=n)
    return (centres[y] + rng.normal(size=(n, d))).astype(np.float32), y


def test_separable_features_reach_high_accuracy():
    x, y = _blobs(400)  # same class centres for both splits
    xtr, ytr, xte, yte = x[:300], y[:300], x[300:], y[300:]
    out = fit_probe(xtr, ytr, xte, yte, l2_grid=(1e-4, 1e-2, 1.0), val_fraction=0.2, max_iter=200)
    assert 0.95 < out["accuracy"] <= 1.0
    assert out["n_val"] == 60 and out["n_train"] == 300 and out["dim"] == 12
    assert set(out["val_accuracy"]) == {"0.0001", "0.01", "1"}
    assert out["l2"] in (1e-4, 1e-2, 1.0)


def test_positions_and_bad_input():
    feats = {"cls": np.ones((3, 2)), "avg": np.zeros((3, 5))}
    assert select_position(feats, "cls+avg").shape == (3, 7)
    with pytest.raises(QLIPError):
        select_position(feats, "mean")
    x, y = _blobs(10)
    with pytest.raises(DataError):
        fit_probe(x, np.full(10, -1), x, y)
    with pytest.raises(QLIPError):
        fit_probe(x, y, x, y, val_fraction=0.0)
