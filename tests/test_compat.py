"""qlip.compat: the torch / transformers versions the library adapts to (torch >= 2.4 supported)."""
import pytest
import torch

from qlip import compat
from qlip.errors import ConfigError, QLIPError


@pytest.mark.parametrize("version, at_least_2_5, at_least_2_9", [
    ("2.4.1+cu121", False, False), ("2.5.0", True, False), ("2.8.0", True, False), ("2.9.0a0+git1234", True, True),
    ("2.14.1+cu130", True, True), ("2.10.0.dev20260101", True, True), ("3.0.0", True, True), ("1.13.1", False, False),
])
def test_torch_at_least(version, at_least_2_5, at_least_2_9):
    assert compat.torch_at_least(2, 5, version) is at_least_2_5
    assert compat.torch_at_least(2, 9, version) is at_least_2_9


def test_flags_follow_the_installed_torch():
    assert compat.SDPA_HAS_GQA == compat.torch_at_least(2, 5)
    assert compat.FSDP_ON_CPU == compat.torch_at_least(2, 9)


def test_fsdp_on_cpu_is_refused_in_one_line_where_torch_cannot(monkeypatch):
    from qlip.train import distributed as D
    monkeypatch.setattr(D, "FSDP_ON_CPU", False)
    with pytest.raises(ConfigError, match=r"train.fsdp on CPU ranks needs torch >= 2.9") as e:
        D.check_fsdp_device(torch.device("cpu"))
    assert "\n" not in str(e.value) and torch.__version__ in str(e.value)
    D.check_fsdp_device(torch.device("cuda", 0))  # GPUs shard on every supported torch
    monkeypatch.setattr(D, "FSDP_ON_CPU", True)
    D.check_fsdp_device(torch.device("cpu"))


def test_transformers_that_cannot_use_this_torch_is_a_one_line_error(monkeypatch):
    import transformers.utils
    compat.require_transformers_models()  # the test environment's pair works
    monkeypatch.setattr(transformers.utils, "is_torch_available", lambda: False)  # transformers 5 beside torch 2.4
    with pytest.raises(QLIPError, match=r"cannot use torch .*pip install 'transformers<5'") as e:
        compat.require_transformers_models()
    assert "\n" not in str(e.value)
    from qlip.vlm.tiny import build_tiny_llm
    with pytest.raises(QLIPError, match="transformers<5"):
        build_tiny_llm("unused-folder")
