"""model.save_pretrained writes our format through qlip.io's writer (the model layer sits below
qlip.io and imports nothing from it; qlip.io registers the writer)."""
import pytest
import torch

import qlip
import qlip.model.qlip as model_module
from qlip.errors import QLIPError


def test_model_save_pretrained_is_the_io_writer(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "a")
    qlip.io.save_pretrained(tiny_model, str(tmp_path / "b"))
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    back = qlip.load(str(tmp_path / "a"))
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_without_a_registered_writer_save_pretrained_says_so(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "_checkpoint_writer", None)
    with pytest.raises(QLIPError, match="no checkpoint writer registered"):
        tiny_model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
