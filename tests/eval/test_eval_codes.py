"""Code statistics on hand-made ids; the paper's compression ratio and bits per image."""
import math

import pytest
import torch

from qlip.errors import QLIPError
from qlip.eval.codes import CodeStats, bits_per_image, code_stats, compression_ratio, ids_to_bits, ids_to_groups


def test_paper_budget_numbers():
    assert compression_ratio(16, 28) == pytest.approx(219.43, abs=0.01)  # QLIP-B/16
    assert compression_ratio(8, 28) == pytest.approx(54.86, abs=0.01)    # QLIP-B/8
    assert compression_ratio(14, 28) == pytest.approx(168.0)             # QLIP-L/14
    assert bits_per_image(256, 16, 28) == 28 * 16 * 16
    assert bits_per_image((392, 392), 14, 28) == 28 * 28 * 28
    with pytest.raises(QLIPError):
        bits_per_image(250, 16, 28)


def test_bit_order_msb_first():
    ids = torch.tensor([0b1000, 0b0001, 0b0110])
    assert ids_to_bits(ids, 4).tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]]
    assert ids_to_groups(ids, 4, 2).tolist() == [[2, 0], [0, 1], [1, 2]]


def test_hand_made_ids():
    # L = 4; ids 0, 15, 15, 3 -> bits 0000, 1111, 1111, 0011
    s = code_stats(torch.tensor([[0, 15], [15, 3]]), num_bits=4, group_size=2)
    assert s["n_tokens"] == 4 and s["distinct_codes"] == 3
    assert s["code_usage"] == pytest.approx(3 / 4)  # min(2**4, 4) = 4
    assert s["bit_p1"] == pytest.approx([0.5, 0.5, 0.75, 0.75])
    h75 = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert s["bit_entropy"] == pytest.approx([1.0, 1.0, h75, h75])
    assert s["code_entropy"] == pytest.approx(1.5)  # p = (1/4, 1/2, 1/4)
    # group 0 (MSBs): 0, 3, 3, 0 -> H = 1; group 1 (LSBs): 0, 3, 3, 3 -> H(1/4, 3/4)
    assert s["group_entropy"] == pytest.approx([1.0, h75])
    assert s["group_usage"] == pytest.approx([2 / 4, 2 / 4])


def test_streaming_equals_one_shot_and_uses_int64_exactly():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2**28, (40, 16), generator=g, dtype=torch.int64)
    ids[:5] = 2**28 - 1  # ids that float32 cannot hold exactly
    stream = CodeStats(28, merge_every=30)
    for chunk in ids.split(7):
        stream.update(chunk)
    a, b = stream.compute(), code_stats(ids, 28)
    assert a == b
    assert a["group_size"] == 14
    assert a["distinct_codes"] == len(torch.unique(ids))


def test_bad_ids():
    with pytest.raises(QLIPError):
        code_stats(torch.tensor([16]), num_bits=4)
    with pytest.raises(QLIPError):
        code_stats(torch.tensor([-1]), num_bits=4)
    with pytest.raises(QLIPError):
        code_stats(torch.tensor([0.5]), num_bits=4)
    with pytest.raises(QLIPError):
        CodeStats(28, group_size=5)
    with pytest.raises(QLIPError):
        CodeStats(4).compute()
