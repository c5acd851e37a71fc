"""`qlip demo vlm --fast` end to end on stand-ins for the QLIP demo's models (tiny, 2 blocks)."""
import json
import shutil

import pytest
import torch

from qlip.errors import ConfigError


def test_demo_vlm_fast_writes_metrics_report_and_a_chat_model(tmp_path, qlip_dir):
    import qlip
    from qlip.demo.vlm import TYPES, run_vlm_demo
    demo = tmp_path / "demo"
    shutil.copytree(qlip_dir, demo / "qlip")
    shutil.copytree(qlip_dir, demo / "recon_only" / "final")
    m = run_vlm_demo(str(demo), str(tmp_path / "out"), fast=True)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(saved) == {"layer_-2", "last_layer", "after_quantizer", "recon_only", "settings"}
    for name in ("layer_-2", "last_layer", "after_quantizer", "recon_only"):
        assert set(saved[name]) == {"accuracy", *TYPES}
        assert all(0.0 <= v <= 1.0 for v in saved[name].values())
        assert saved[name] == m[name]
    assert "layer_-2" in (tmp_path / "out" / "report.html").read_text()
    from qlip.vlm import load
    assert load(str(tmp_path / "out" / "vlm")).config.layer == -2
    # a one-block QLIP (today's demo recipe) has no layer -2: refused with a message
    shallow = tmp_path / "shallow"
    torch.manual_seed(0)
    qlip.load("qlip-tiny", pretrained=False, **{"vision.depth": 1}).save_pretrained(str(shallow / "qlip"))
    with pytest.raises(ConfigError, match="1 encoder block"):
        run_vlm_demo(str(shallow), str(tmp_path / "out2"), fast=True, recon_path=str(qlip_dir))
