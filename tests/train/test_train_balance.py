"""qlip balance: recon-only and align-only probe runs -> alpha_r / alpha_a = L_align(inf) / L_mse(inf)."""
import json

import pytest
import yaml

from _train_testutils import read_log, tiny_recipe, write_recipe


def test_balance_writes_the_balanced_recipe(shapes_dir, tmp_path, capsys):
    from qlip.cli import main
    from qlip.losses import balanced_loss_weights
    from qlip.train.recipe import load_recipe
    d = tiny_recipe(shapes_dir, loss={"alpha_a": 0.5, "alpha_r": 1.0})
    path = write_recipe(tmp_path / "stage1.yaml", d)
    assert main(["balance", path, "optim.lr=1e-3", "--out", str(tmp_path / "probes"), "--steps", "4",
                 "--tail", "0.5"]) == 0
    out = json.loads(capsys.readouterr().out)

    recon, align = read_log(tmp_path / "probes" / "recon"), read_log(tmp_path / "probes" / "align")
    assert len(recon) == len(align) == 4
    assert "contrastive" not in recon[0] and "mse" not in align[0]  # each probe trains one objective
    l_mse = sum(r["mse"] for r in recon[-2:]) / 2
    l_align = sum(r["contrastive"] for r in align[-2:]) / 2
    assert out["l_mse_inf"] == pytest.approx(l_mse) and out["l_align_inf"] == pytest.approx(l_align)
    alpha_r, alpha_a = balanced_loss_weights(l_align, l_mse, align_weight=0.5)
    assert out["alpha_r"] == pytest.approx(alpha_r) and out["alpha_a"] == 0.5
    assert out["alpha_r"] / out["alpha_a"] == pytest.approx(l_align / l_mse)

    assert out["output"] == str(tmp_path / "probes" / "stage1.balanced.yaml")
    balanced = load_recipe(out["output"])
    assert balanced.loss.alpha_r == pytest.approx(alpha_r) and balanced.loss.alpha_a == 0.5
    assert balanced.optim.lr == 1e-3  # overrides are kept
    with open(out["output"]) as f:
        assert f.readline().startswith("# balanced by `qlip balance`")

    # a rerun reuses the finished probes (no training: the logs are untouched)
    mtime = (tmp_path / "probes" / "recon" / "log.jsonl").stat().st_mtime_ns
    from qlip.train.balance import balance
    again = balance(path, ["optim.lr=1e-3"], str(tmp_path / "probes"), steps=4, tail=0.5,
                    output=str(tmp_path / "b.yaml"))
    assert again["alpha_r"] == pytest.approx(out["alpha_r"])
    assert (tmp_path / "probes" / "recon" / "log.jsonl").stat().st_mtime_ns == mtime
    assert yaml.safe_load((tmp_path / "b.yaml").read_text())["loss"]["alpha_r"] == pytest.approx(alpha_r)


def test_balance_rejects_stage2_and_bad_tail(shapes_dir, tmp_path):
    from qlip.errors import ConfigError
    from qlip.train.balance import balance
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(shapes_dir))
    with pytest.raises(ConfigError, match="tail"):
        balance(path, [], str(tmp_path / "p"), tail=0)
    with pytest.raises(ConfigError, match="stage 1"):
        balance(path, ["train.stage=2", "loss.alpha_a=0"], str(tmp_path / "p"))


def test_balance_reads_the_reconstruction_term_of_the_recipes_kind(shapes_dir, tmp_path):
    """With loss.recon_kind: l1 the reconstruction probe logs 'l1' (no 'mse'), and L_recon(inf) is its tail mean."""
    from qlip.train.balance import balance
    path = write_recipe(tmp_path / "s1.yaml", tiny_recipe(shapes_dir, loss={"recon_kind": "l1"}))
    out = balance(path, [], str(tmp_path / "probes"), steps=2, tail=1.0)
    recon = read_log(tmp_path / "probes" / "recon")
    assert "l1" in recon[0] and "mse" not in recon[0]
    assert out["l_mse_inf"] == pytest.approx(sum(r["l1"] for r in recon) / len(recon))
