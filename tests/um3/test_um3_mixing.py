"""Mixed batches: layouts and targets of the three kinds, Eq. 7's share of text rows, batches a pure
function of (seed, index), ranks = slices of the one-process batch, global target counts."""
import numpy as np
import pytest
import torch

from _um3_utils import BITS, GRID, GROUPS, write_corpus, write_token_shards
from qlip.data.tokens import TokenShardDataset
from qlip.errors import ConfigError, DataError
from qlip.um3.loss import IGNORE
from qlip.um3.mixing import I2T, T2I, TEXT, MixConfig, MixedLoader, tokenize_corpus
from qlip.um3.text import make_byte_tokenizer
from qlip.um3.vocab import UM3Vocab

VOCAB = UM3Vocab(text_size=258, bits=BITS, groups=GROUPS)
N_SUB = GRID[0] * GRID[1] * GROUPS


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix")
    tok = make_byte_tokenizer()
    return tokenize_corpus(write_corpus(d / "c.txt"), tok), TokenShardDataset(write_token_shards(d / "tok")), tok


def _loader(sources, rank=0, world=1, batch=8, **mix):
    text, images, tok = sources
    m = MixConfig(batch_size=batch, seq_len=40, r0=0.75, rT=0.25, T=4, **mix)
    return MixedLoader(text, images, VOCAB, tok, m, seed=3, rank=rank, world_size=world)


def test_rows_have_the_documented_layout_and_targets(sources):
    _, images, tok = sources
    L = _loader(sources, batch=64, cfg_dropout=0.3)
    b = L.batch(0)
    kinds = b["kind"].tolist()
    assert {TEXT, I2T, T2I} <= set(kinds)
    drops = 0
    for j, k in enumerate(kinds):
        seq, lab = b["tokens"][j], b["labels"][j]
        tgt = lab != IGNORE
        if k == TEXT:
            assert tgt.all() and torch.equal(lab, seq[1:]) and (seq < VOCAB.text_size).all()
            continue
        assert int(seq[0]) == tok.bos_id
        boi = int((seq == VOCAB.boi).nonzero()[0])
        vis = seq[boi + 1: boi + 1 + N_SUB]
        assert int(seq[boi + 1 + N_SUB]) == VOCAB.eoi and (vis >= VOCAB.visual_start).all()
        ids = VOCAB.visual.decode(vis[None])[0]
        match = [i for i in range(len(images)) if np.array_equal(images.ids[i], ids.numpy())]
        assert match
        if k == I2T:  # loss on the caption and <eos> only
            assert boi == 1
            cap = tok.decode(seq[boi + 2 + N_SUB:][tgt[boi + 1 + N_SUB:]].tolist())
            assert cap in {images.captions[i] for i in match}
            assert int(lab[tgt][-1]) == tok.eos_id and int(tgt.sum()) == len(tok.encode(cap)) + 1
        else:  # loss on the visual sub-tokens and <eoi>
            assert torch.equal(lab[tgt], seq[boi + 1: boi + 2 + N_SUB])
            drops += boi == 1
            if boi > 1:
                assert tok.decode(seq[1:boi].tolist()) in {images.captions[i] for i in match}
    assert drops >= 1
    assert int(b["n_targets"]) == int((b["labels"] != IGNORE).sum())
    assert b["n_kind"].tolist() == [int((b["labels"][b["kind"] == k] != IGNORE).sum()) for k in range(3)]


@pytest.mark.parametrize("schedule", ["calm_down", "constant"])
def test_text_rows_follow_the_schedule(sources, schedule):
    L = _loader(sources, batch=20, schedule=schedule, grad_accum=2)
    for i in range(12):  # step = i // 2
        step = i // 2
        r = 0.25 if schedule == "constant" or step > 4 else (0.25 - 0.75) / 4 * (step - 4) + 0.25
        assert int((L.batch(i)["kind"] == TEXT).sum()) == round(20 * r)


def test_batches_are_pure_and_ranks_are_slices(sources):
    one = _loader(sources, batch=8)
    ranks = [_loader(sources, rank=r, world=2, batch=4) for r in range(2)]
    for i in (0, 5):
        full = one.batch(i)
        parts = [r.batch(i) for r in ranks]
        for k in ("tokens", "labels", "kind"):
            assert torch.equal(torch.cat([p[k] for p in parts]), full[k])
        assert all(torch.equal(p["n_targets"], full["n_targets"]) for p in parts)
    it = iter(one)
    first = [next(it) for _ in range(3)]
    state = one.state_dict()
    again = _loader(sources, batch=8)
    again.load_state_dict([state])
    assert torch.equal(next(iter(again))["tokens"], one.batch(3)["tokens"])
    assert torch.equal(first[1]["tokens"], _loader(sources, batch=8).batch(1)["tokens"])
    other = _loader(sources, batch=4)
    with pytest.raises(DataError, match="batch_size"):
        other.load_state_dict(state)


def test_bad_settings_fail_clearly(sources):
    text, images, tok = sources
    with pytest.raises(ConfigError, match="no room for a caption"):
        MixedLoader(text, images, VOCAB, tok, MixConfig(batch_size=2, seq_len=10))
    with pytest.raises(ConfigError, match="8-bit ids"):
        MixedLoader(text, images, UM3Vocab(258, bits=10, groups=2), tok, MixConfig(batch_size=2, seq_len=40))


def test_i2t_from_makes_every_multimodal_row_a_drawing_until_that_step(sources):
    """data.i2t_from (drawing first): before the step, the rows that would be image-to-text are
    text-to-image (same text rows, same images); from the step on, the batches are exactly those of
    a loader without it."""
    base, late = _loader(sources, batch=32), _loader(sources, batch=32, i2t_from=3)
    for i in range(6):
        a, b = base.batch(i), late.batch(i)
        if i < 3:
            assert (a["kind"] == I2T).any() and not (b["kind"] == I2T).any()
            assert torch.equal(a["kind"] == TEXT, b["kind"] == TEXT)
            same = a["kind"] != I2T
            assert torch.equal(a["tokens"][same], b["tokens"][same])
        else:
            for k in ("tokens", "labels", "kind"):
                assert torch.equal(a[k], b[k])
    assert late._settings()["mix"][-1] == 3 and base._settings()["mix"] == late._settings()["mix"][:-1]
