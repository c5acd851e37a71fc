"""`qlip um3 generate` end to end with a (random) QLIP: captions an image file and draws PNGs of the
QLIP's size; wrong combinations fail with one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from _um3_utils import tiny_llama


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    import qlip
    from qlip.um3.model import from_llama, save_um3
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    q = qlip.load("qlip-tiny", pretrained=False)           # 28-bit ids, 4 x 4 grid, 32 px
    q.save_pretrained(str(d / "qlip"))
    model, tok = from_llama(tiny_llama(d / "llama"), bits=q.num_bits, groups=2)
    save_um3(model, tok, str(d / "um3"))
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)).save(d / "x.png")
    return d


def test_caption_and_draw_through_the_cli(folders, capsys):
    from qlip.cli import main
    d = folders
    assert main(["um3", "generate", "--model", str(d / "um3"), "--image", str(d / "x.png"), "--qlip", str(d / "qlip"),
                 "--max-new-tokens", "4", "-o", str(d / "cap.txt")]) == 0
    assert len((d / "cap.txt").read_text().splitlines()) == 1
    # by default a caption is greedy and unguided (the demo's captions), whatever --cfg draws use
    import qlip
    from qlip.um3.generate import Sampling, caption
    from qlip.um3.model import load_um3
    q = qlip.load(str(d / "qlip"))
    model, tok = load_um3(str(d / "um3"))
    ids = q.tokenize(q.preprocess(str(d / "x.png")))
    want = caption(model, tok, ids, 4, Sampling(temperature=0.0))[0]
    assert (d / "cap.txt").read_text().rstrip("\n") == want
    assert want != caption(model, tok, ids, 4, Sampling(temperature=0.0, cfg_scale=5.0))[0]
    assert main(["um3", "generate", "--model", str(d / "um3"), "--draw", "a red circle", "--qlip", str(d / "qlip"),
                 "-n", "2", "--cfg", "2", "-o", str(d / "draw.png")]) == 0
    for i in range(2):
        assert Image.open(d / f"draw_{i}.png").size == (32, 32)
    assert main(["um3", "generate", "--model", str(d / "um3"), "--draw", "a red circle", "-o", str(d / "y.png")]) == 2
    assert "need --qlip" in capsys.readouterr().err
