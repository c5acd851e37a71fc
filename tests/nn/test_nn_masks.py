"""Boolean SDPA masks (True = attend): truth tables, padding, prefix-LM, KV-cache decoding."""
import torch

from qlip.nn import (causal_mask, causal_padding_mask, decode_mask, padded_positions, prefix_lm_mask, sdpa,
                     with_key_padding)


def T(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_causal_and_cache_decoding_tables():
    assert torch.equal(causal_mask(3), T([[1, 0, 0], [1, 1, 0], [1, 1, 1]]))
    # 2 queries at positions 3, 4 after 3 cached keys
    assert torch.equal(causal_mask(2, start=3), T([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))
    assert torch.equal(decode_mask(4, 1), T([[1, 1, 1, 1, 1]]))
    assert decode_mask(4, 2).shape == (2, 6)


def test_right_and_left_padding_tables():
    right = T([[1, 1, 1, 0], [1, 1, 0, 0]])
    m = causal_padding_mask(right)
    assert m.shape == (2, 1, 4, 4)
    assert torch.equal(m[1, 0], T([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]))
    left = T([[1, 1, 1, 1], [0, 0, 1, 1]])
    m = causal_padding_mask(left)
    assert torch.equal(m[0, 0], causal_mask(4))
    # pad queries (rows 0, 1) would see nothing: they fall back to their own position
    assert torch.equal(m[1, 0], T([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]))


def test_real_queries_never_attend_to_pads_and_no_row_is_empty():
    torch.manual_seed(0)
    valid = torch.rand(5, 7) > 0.4
    valid[:, -1] = True
    for q_len in (7, 3, 1):
        m = causal_padding_mask(valid, q_len=q_len)
        assert m.shape == (5, 1, q_len, 7)
        real_q = valid[:, -q_len:]
        attends_pad = (m[:, 0] & ~valid[:, None, :]).any(-1)           # (B, Tq)
        assert not attends_pad[real_q].any()
        assert m.any(-1).all()
        # with SDPA: finite everywhere, and pad keys have no influence on real queries
        q, k, v = torch.randn(5, 2, q_len, 4), torch.randn(5, 2, 7, 4), torch.randn(5, 2, 7, 4)
        out = sdpa(q, k, v, mask=m)
        assert torch.isfinite(out).all()
        v2 = torch.where(valid[:, None, :, None], v, torch.full_like(v, 1e4))
        out2 = sdpa(q, k, v2, mask=m)
        sel = real_q[:, None, :].expand(5, 2, q_len)
        torch.testing.assert_close(out2[sel], out[sel])


def test_prefix_lm_tables():
    assert torch.equal(prefix_lm_mask(4, 2), T([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))
    per_row = prefix_lm_mask(3, torch.tensor([0, 3]))
    assert per_row.shape == (2, 1, 3, 3)
    assert torch.equal(per_row[0, 0], causal_mask(3))
    assert per_row[1, 0].all()
    # decoding after a prefix of 3: the new query is causal and sees the whole prefix
    assert torch.equal(prefix_lm_mask(1, 3, start=4), T([[1, 1, 1, 1, 1]]))
    # prefilled prefix queries inside a chunk after a cache see the full prefix ahead of them
    assert torch.equal(prefix_lm_mask(2, 3, start=1), T([[1, 1, 1], [1, 1, 1]]))


def test_decode_mask_with_padding_and_positions():
    valid = T([[0, 1, 1, 1], [1, 1, 1, 1]])
    m = decode_mask(3, 1, valid)
    assert torch.equal(m[:, 0, 0], valid)
    assert torch.equal(padded_positions(T([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])),
                       torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]))
    assert torch.equal(with_key_padding(causal_mask(1, 3), valid), m)
