"""qlip.um3.scoring and benchmarks/um3_colour_gain.py: the drawing rows it scores are the training layout's, the colour
swap changes every colour word and only those, the gains are the differences of the NLLs."""
import importlib.util
import os
import random

import numpy as np
import pytest
import torch

from _um3_utils import tiny_llama, write_corpus, write_token_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench():
    spec = importlib.util.spec_from_file_location("um3_colour_gain", os.path.join(REPO, "benchmarks", "um3_colour_gain.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_swap_colours_changes_each_colour_word_only():
    from qlip.data.shapes import COLOR_NAMES
    cap = "a red circle and a blue star on the left"
    from qlip.um3.scoring import swap_colours
    out = swap_colours(cap, random.Random(0)).split()
    for a, b in zip(cap.split(), out):
        assert (a != b and b in COLOR_NAMES) if a in COLOR_NAMES else a == b


def test_gains_score_the_training_layout(tmp_path):
    from qlip.data.tokens import TokenShardDataset
    from qlip.um3.loss import IGNORE
    from qlip.um3.mixing import T2I, MixConfig, MixedLoader, tokenize_corpus
    from qlip.um3.model import from_llama, load_um3, save_um3
    torch.manual_seed(0)
    model, tok = from_llama(tiny_llama(tmp_path / "llama"), bits=8, groups=2, visual_init="bits")
    save_um3(model, tok, str(tmp_path / "um3"))
    tokens = write_token_shards(tmp_path / "tok", count=8)
    bench = _bench()
    res = bench.colour_gain(str(tmp_path / "um3"), tokens, n=6)
    assert res["images"] == 6
    assert res["caption_gain"] == pytest.approx(res["nll_no_caption"] - res["nll_caption"], abs=1e-9)
    assert res["colour_gain"] == pytest.approx(res["nll_colour_swapped"] - res["nll_caption"], abs=1e-9)
    # the NLL of one drawing equals that of the training loader's text-to-image row of the same pair
    model, tok = load_um3(str(tmp_path / "um3"))
    data = TokenShardDataset(tokens)
    loader = MixedLoader(tokenize_corpus(write_corpus(tmp_path / "c.txt"), tok), data, model.vocab, tok,
                         MixConfig(batch_size=1, seq_len=40))
    for i in range(2):
        seq, target, _ = loader._row(T2I, 0, i, drop_caption=False)
        s = torch.tensor([seq])
        lab = s[:, 1:].clone()
        lab[0, ~torch.tensor(target)] = IGNORE
        with torch.no_grad():
            want = float(model.nll(s[:, :-1], lab, "split").sum())
        from qlip.um3.scoring import drawing_nll
        ids = torch.from_numpy(np.array(data.ids[i], dtype=np.int64))[None]
        got = drawing_nll(model, tok, [str(data.captions[i])], ids)
        assert float(got[0]) == pytest.approx(want, rel=1e-5)
