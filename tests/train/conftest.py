import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread(request):
    """Tiny models run fastest (and deterministically) on one thread, also on a busy machine.
    Module-scoped (autouse: before the modules' other fixtures); only for the test_train_* modules."""
    if not request.module.__name__.startswith("test_train_"):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """64 captioned 32x32 shapes in 4 shards of 16."""
    from qlip.data.shapes import generate_shapes
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(str(out), n=64, size=32, shard_size=16, heldout_n=0, progress=False)
    return out
