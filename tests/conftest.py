import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official-tiny"
if not FIXTURES.is_dir():  # CI clones the repo next to a copy of shared/
    FIXTURES = pathlib.Path(os.environ.get("QLIP_FIXTURES", "/work/shared/fixtures/official-tiny"))


@pytest.fixture(scope="session")
def fixtures_dir():
    assert FIXTURES.is_dir(), f"official fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    import qlip
    return qlip.load("qlip-tiny", pretrained=False)
