"""1-D RoPE: rotate-half layout, relative-position property, Llama-3 scaling bands, own tables."""
import math

import pytest
import torch

from qlip.errors import ConfigError
from qlip.nn import (CausalLMConfig, CausalTransformer, Llama3RopeScaling, apply_rotary, llama3_scale_inv_freq,
                     rope_1d_table, rope_inv_freq, rope_table_from_angles)


def test_rotate_half_layout_on_a_basis_vector():
    inv = rope_inv_freq(4, theta=100.0)
    torch.testing.assert_close(inv, torch.tensor([1.0, 0.1]))
    cos, sin = rope_1d_table(torch.tensor([3]), inv)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    y = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4)
    qx, qy = apply_rotary(x, y, cos, sin)
    # channel 0 pairs with channel 2 (half split), angle 3 * 1; channel 1 with 3, angle 3 * 0.1
    torch.testing.assert_close(qx.flatten(), torch.tensor([math.cos(3), 0, math.sin(3), 0]))
    torch.testing.assert_close(qy.flatten(), torch.tensor([0, math.cos(0.3), 0, math.sin(0.3)]))


def test_rotated_dot_product_depends_only_on_offset():
    torch.manual_seed(0)
    inv = rope_inv_freq(32)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def dot(m, n):
        cq, sq = rope_1d_table(torch.tensor([m]), inv)
        ck, sk = rope_1d_table(torch.tensor([n]), inv)
        return (apply_rotary(q, q, cq, sq)[0] * apply_rotary(k, k, ck, sk)[0]).sum()

    for m, n in [(3, 1), (7, 7), (2, 9)]:
        for shift in (1, 5, 40):
            torch.testing.assert_close(dot(m + shift, n + shift), dot(m, n), atol=1e-5, rtol=0)
    assert abs(dot(3, 1) - dot(4, 1)) > 1e-3          # a different offset gives a different score
    # rotations keep the norm
    cos, sin = rope_1d_table(torch.arange(5), inv)
    rq, _ = apply_rotary(q.expand(1, 1, 5, 32), k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1).expand(1, 1, 5))


def test_per_row_positions_broadcast_over_heads():
    inv = rope_inv_freq(8)
    pos = torch.tensor([[0, 1, 2], [5, 6, 7]])
    cos, sin = rope_1d_table(pos, inv)
    assert cos.shape == (2, 3, 8)
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    rq, rk = apply_rotary(q, k, cos, sin)
    for b in range(2):
        c, s = rope_1d_table(pos[b], inv)
        eq, ek = apply_rotary(q[b:b + 1], k[b:b + 1], c, s)
        torch.testing.assert_close(rq[b:b + 1], eq)
        torch.testing.assert_close(rk[b:b + 1], ek)


def test_llama3_scaling_three_bands():
    s = Llama3RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
    wavelen = torch.tensor([8.0, 32.0, 128.0])          # below 64/4, between, above 64/1
    inv = 2 * math.pi / wavelen
    got = llama3_scale_inv_freq(inv, s)
    smooth = (64 / 32 - 1) / (4 - 1)
    expected = torch.stack([inv[0], (1 - smooth) * inv[1] / 8 + smooth * inv[1], inv[2] / 8])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(rope_inv_freq(16, 10000.0, s), llama3_scale_inv_freq(rope_inv_freq(16), s))


def test_llama3_scaling_from_dict_validation():
    s = Llama3RopeScaling.from_dict({"rope_type": "llama3", "factor": 32.0, "rope_theta": 5e5})
    assert s.factor == 32.0 and s.original_max_position_embeddings == 8192
    with pytest.raises(ConfigError, match="yarn"):
        Llama3RopeScaling.from_dict({"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="unknown keys.*beta"):
        Llama3RopeScaling.from_dict({"factor": 4.0, "beta": 1})
    with pytest.raises(ConfigError, match="low_freq_factor < high_freq_factor"):
        Llama3RopeScaling.from_dict({"low_freq_factor": 4.0, "high_freq_factor": 4.0})


@torch.no_grad()
def test_model_accepts_its_own_rope_tables():
    torch.manual_seed(0)
    model = CausalTransformer(CausalLMConfig(vocab_size=31, dim=32, n_layers=1, n_heads=2, ffn_hidden=32,
                                             init_std=0.2)).eval()
    ids = torch.randint(0, 31, (2, 9))
    pos = torch.arange(9)
    base = model(ids)
    torch.testing.assert_close(model(ids, rope=model.rope_tables(pos)), base, rtol=0, atol=0)
    # a 2-D grid RoPE for a 3x3 image: half the frequencies follow the row, half the column
    inv = rope_inv_freq(16)                              # 8 frequencies for head_dim 16
    rows, cols = pos // 3, pos % 3
    angles = torch.cat([rows[:, None] * inv[None, :4], cols[:, None] * inv[None, :4]], dim=-1)
    grid = rope_table_from_angles(angles)                # (9, 16)
    out = model(ids, rope=grid)
    assert (out - base).abs().max() > 1e-4              # the tables are really used
    per_row = model(ids, rope=(grid[0].expand(2, 9, 16), grid[1].expand(2, 9, 16)))
    torch.testing.assert_close(per_row, out)
    # 2-D relative property: the score depends only on the (row, col) offset
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(i, j):
        rq = apply_rotary(q, q, grid[0][i], grid[1][i])[0]
        rk = apply_rotary(k, k, grid[0][j], grid[1][j])[0]
        return (rq * rk).sum()

    torch.testing.assert_close(score(4, 0), score(8, 4), atol=1e-5, rtol=0)   # offset (1, 1) both
    assert abs(score(4, 0) - score(5, 0)) > 1e-4
