"""Shared tiny fixtures of the VLM tests: a 2-block QLIP (qlip-tiny, 32 px, 16 patch tokens), a
tiny random Llama with a byte-level BPE tokenizer in HF format, and shapes QA data in LLaVA's
format; all built offline."""
import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def qa_dir(tmp_path_factory):
    from qlip.data.shapes_qa import write_shapes_qa
    out = tmp_path_factory.mktemp("shapes-qa")
    write_shapes_qa(str(out), 24, split="train", size=32)
    write_shapes_qa(str(out), 4, split="heldout", size=32)
    return out


@pytest.fixture(scope="session")
def qlip_dir(tmp_path_factory):
    import qlip
    torch.manual_seed(0)
    m = qlip.load("qlip-tiny", pretrained=False)
    m.drop_text()
    out = tmp_path_factory.mktemp("qlip") / "qlip"
    m.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def llm_dir(tmp_path_factory, qa_dir):
    import json
    from qlip.vlm.tiny import build_tiny_llm
    texts = [t["value"] for r in json.loads((qa_dir / "train.json").read_text()) for t in r["conversations"]]
    out = tmp_path_factory.mktemp("llm") / "tiny-llama"
    build_tiny_llm(str(out), texts, vocab_size=300, hidden_size=32, layers=2, heads=4, kv_heads=2,
                   intermediate_size=64)
    return out


@pytest.fixture()
def vlm(qlip_dir, llm_dir):
    from qlip.vlm import build_vlm
    torch.manual_seed(0)
    return build_vlm(str(qlip_dir), str(llm_dir)).eval()
