import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Outputs of the official code on its own tiny checkpoints (see the README there); inside the
# repository, so that a plain clone runs every test.
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "official-tiny"


@pytest.fixture(scope="session")
def fixtures_dir():
    assert FIXTURES.is_dir(), f"official fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    import qlip
    return qlip.load("qlip-tiny", pretrained=False)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """32 captioned 32x32 shapes in one training shard, and 32 labelled held-out ones (one per class)."""
    from qlip.data.shapes import generate_shapes
    out = tmp_path_factory.mktemp("tiny_shapes")
    generate_shapes(str(out), n=32, size=32, shard_size=32, heldout_n=32, progress=False)
    return out
