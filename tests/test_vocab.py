"""VisualVocab: exact ids <-> sub-tokens <-> vocabulary rows, MSB-first like bsq, range errors."""
import numpy as np
import pytest
import torch

from qlip.errors import DataError
from qlip.quant import VisualVocab, ids_to_bits

EDGES = torch.tensor([0, 1, 2 ** 14 - 1, 2 ** 14, 2 ** 27, 2 ** 28 - 1], dtype=torch.int64)


def _random_ids(n=10 ** 6, bits=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2 ** bits, (n,), generator=g, dtype=torch.int64)


@pytest.mark.parametrize("groups", [1, 2, 4, 7])
@pytest.mark.parametrize("shared", [False, True])
def test_round_trip_exact_million_ids_and_edges(groups, shared):
    vocab = VisualVocab(bits=28, groups=groups, offset=50_000, shared=shared)
    ids = torch.cat([_random_ids(), EDGES])
    sub = vocab.split(ids)
    assert sub.shape == (ids.numel(), groups) and sub.dtype == torch.int64
    assert int(sub.min()) >= 0 and int(sub.max()) < 2 ** (28 // groups)
    assert torch.equal(vocab.merge(sub), ids)
    rows = vocab.to_vocab(ids)
    assert int(rows.min()) >= vocab.offset and int(rows.max()) < vocab.offset + vocab.size
    assert torch.equal(vocab.from_vocab(rows), ids)
    assert torch.equal(vocab.merge(vocab.split(EDGES)), EDGES)
    # edges: 0 is all-zero groups, 2**28 - 1 is all-ones groups
    assert vocab.split(torch.tensor(0)).tolist() == [0] * groups
    assert vocab.split(torch.tensor(2 ** 28 - 1)).tolist() == [2 ** (28 // groups) - 1] * groups


@pytest.mark.parametrize("groups", [1, 2, 4, 7])
def test_msb_first_agrees_with_bsq_bits(groups):
    vocab = VisualVocab(bits=28, groups=groups)
    ids = torch.cat([_random_ids(5000, seed=1), EDGES])
    bits = ids_to_bits(ids, 28)  # channel 0 = MSB
    gb = 28 // groups
    weights = 2 ** torch.arange(gb - 1, -1, -1, dtype=torch.int64)
    expected = (bits.view(-1, groups, gb) * weights).sum(-1)  # group g = channels g*gb .. (g+1)*gb-1
    assert torch.equal(vocab.split(ids), expected)
    # a single high bit lands in group 0
    assert vocab.split(torch.tensor(2 ** 27)).tolist() == [2 ** (gb - 1)] + [0] * (groups - 1)


def test_sizes_and_row_layout():
    v = VisualVocab()  # 28 bits, 2 x 14, offset 0
    assert (v.group_bits, v.group_size, v.size, v.end) == (14, 16384, 32768, 32768)
    ids = torch.tensor([(5 << 14) | 7])
    assert v.split(ids).tolist() == [[5, 7]]
    assert v.to_vocab(ids).tolist() == [[5, 16384 + 7]]
    s = VisualVocab(offset=100, shared=True)
    assert s.size == 16384 and s.to_vocab(ids).tolist() == [[105, 107]]
    assert VisualVocab(offset=100).to_vocab(ids).tolist() == [[105, 100 + 16384 + 7]]
    assert [VisualVocab(groups=4, offset=3).group_start(g) for g in range(4)] == [3, 3 + 128, 3 + 256, 3 + 384]


def test_sequence_order_and_round_trip():
    v = VisualVocab(bits=28, groups=2, offset=10)
    ids = _random_ids(2 * 3 * 4, seed=2).view(2, 3, 4)          # (B, h, w) as model.tokenize returns
    seq = v.encode(ids)
    assert seq.shape == (2, 3 * 4 * 2)
    rows = v.to_vocab(ids.view(2, 12))                           # (B, N, G)
    assert seq[0, :4].tolist() == [rows[0, 0, 0], rows[0, 0, 1], rows[0, 1, 0], rows[0, 1, 1]]
    assert torch.equal(v.decode(seq), ids.view(2, 12))
    assert torch.equal(v.unflatten(v.flatten(rows)), rows)
    assert torch.equal(v.encode(ids.view(2, 12)), seq)
    # numpy input (e.g. int32 token shards) is accepted
    assert torch.equal(v.decode(v.encode(ids.view(2, 12).numpy().astype(np.int32))), ids.view(2, 12))


def test_errors():
    with pytest.raises(DataError, match="divisible by groups"):
        VisualVocab(bits=28, groups=3)
    with pytest.raises(DataError, match="at most 31 bits"):
        VisualVocab(bits=62, groups=1)
    with pytest.raises(DataError, match="offset"):
        VisualVocab(offset=-1)
    v = VisualVocab(offset=1000)
    for bad in ([-1], [2 ** 28], [0, 2 ** 40]):
        with pytest.raises(DataError, match=r"\[0, 2\*\*28\)"):
            v.split(torch.tensor(bad))
        with pytest.raises(DataError, match=r"\[0, 2\*\*28\)"):
            v.to_vocab(torch.tensor(bad))
    with pytest.raises(DataError, match="integer"):
        v.split(torch.tensor([1.0]))
    with pytest.raises(DataError, match=r"2\*\*14"):
        v.merge(torch.tensor([[2 ** 14, 0]]))
    with pytest.raises(DataError, match="last dimension of 2"):
        v.merge(torch.tensor([[1, 2, 3]]))
    with pytest.raises(DataError, match=r"visual tokens in \[1000, 33768\)"):
        v.from_vocab(torch.tensor([[999, 1000 + 16384]]))       # a text token
    with pytest.raises(DataError, match=r"visual tokens in \[1000, 33768\)"):
        v.from_vocab(torch.tensor([[1000, 33768]]))
    with pytest.raises(DataError, match="not a row of group 0"):
        v.from_vocab(torch.tensor([[1000 + 16384, 1000 + 16384]]))  # a group-1 row in position 0
    with pytest.raises(DataError, match="not a row of group 1"):
        v.from_vocab(torch.tensor([[1000, 1000]]))
    with pytest.raises(DataError, match="divisible by 2"):
        v.decode(torch.tensor([[1000, 1000 + 16384, 1000]]))
    # shared rows: any row of the block is valid at any position, outside rows are not
    s = VisualVocab(offset=1000, shared=True)
    assert s.from_vocab(torch.tensor([[1000, 1000]])).tolist() == [0]
    with pytest.raises(DataError, match="visual tokens"):
        s.from_vocab(torch.tensor([[1000, 1000 + 16384]]))
