"""KV-cached decoding of CausalTransformer equals full recomputation (GQA + QK-norm, batch > 1)."""
import pytest
import torch

import qlip.nn.causal_attention as causal_attention
from qlip.errors import QLIPError
from qlip.nn import CausalLMConfig, CausalTransformer, causal_padding_mask, decode_mask, padded_positions


def tiny(**kw):
    torch.manual_seed(0)
    cfg = CausalLMConfig(vocab_size=53, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                         qk_norm=True, max_seq_len=16, init_std=0.1, **kw)
    return CausalTransformer(cfg).eval()


@torch.no_grad()
def test_cached_decoding_matches_full_recomputation():
    model = tiny()
    ids = torch.randint(0, 53, (3, 12))
    full = model(ids)
    cache = model.make_cache(batch=3, max_len=12)
    # prefill 5 tokens, then a chunk of 3 after the cached prefix (mask path), then 1 by 1
    pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:8], cache=cache)]
    for t in range(8, 12):
        assert cache[0].length == t
        pieces.append(model(ids[:, t:t + 1], cache=cache))
    cached = torch.cat(pieces, dim=1)
    assert (cached - full).abs().max().item() <= 1e-5
    # the causal part is real: changing a later token changes no earlier logits but the later ones
    ids2 = ids.clone()
    ids2[:, 9] = (ids2[:, 9] + 1) % 53
    full2 = model(ids2)
    assert torch.equal(full2[:, :9], full[:, :9])
    assert (full2[:, 9:] - full[:, 9:]).abs().max() > 1e-3


@torch.no_grad()
def test_reset_cache_and_explicit_start_reproduce():
    model = tiny()
    ids = torch.randint(0, 53, (2, 6))
    cache = model.make_cache(batch=2, max_len=6)
    first = torch.cat([model(ids[:, :4], cache=cache), model(ids[:, 4:], cache=cache)], 1)
    for c in cache:
        c.reset()
    assert cache[0].length == 0 and cache[0].k.abs().sum() == 0
    again = torch.cat([model(ids[:, :4], cache=cache, start=0), model(ids[:, 4:], cache=cache, start=4)], 1)
    assert torch.equal(first, again)


@torch.no_grad()
def test_gqa_paths_equal_explicit_attention(monkeypatch):
    """Both GQA paths of ``sdpa`` (SDPA's ``enable_gqa`` on torch >= 2.5, repeated k/v before it)
    equal softmax attention written out, causal and with a padding mask; and the model agrees."""
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g), torch.randn(2, 2, 7, 8, generator=g)
    kr, vr = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # query head h reads kv head h // 2
    scores = q @ kr.transpose(-1, -2) / 8 ** 0.5
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    pad = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    pad[1, ..., :2] = False  # sequence 1 is left-padded by two
    mask = causal & pad
    want_causal = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vr
    want_masked = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vr
    model, ids = tiny(), torch.randint(0, 53, (2, 7))
    outs = []
    for flag in ([True, False] if causal_attention.SDPA_HAS_GQA else [False]):  # torch 2.4: the fallback only
        monkeypatch.setattr(causal_attention, "SDPA_HAS_GQA", flag)
        torch.testing.assert_close(causal_attention.sdpa(q, k, v, is_causal=True), want_causal, rtol=1e-5, atol=1e-6)
        rows = mask.any(-1).expand(2, 4, 7)  # a padded query sees no key: its row is undefined (unused)
        torch.testing.assert_close(causal_attention.sdpa(q, k, v, mask=mask)[rows], want_masked[rows], rtol=1e-5,
                                   atol=1e-6)
        outs.append(model(ids))
    assert all((o - outs[0]).abs().max().item() <= 1e-6 for o in outs)


@pytest.mark.parametrize("enable_gqa", [True, False])
@torch.no_grad()
def test_left_padded_batch_decodes_like_each_sequence_alone(enable_gqa, monkeypatch):
    if not causal_attention.SDPA_HAS_GQA:
        enable_gqa = False                                   # torch 2.4: the fallback both times
    monkeypatch.setattr(causal_attention, "SDPA_HAS_GQA", enable_gqa)
    model = tiny()
    lengths = [5, 3, 4]
    seqs = [torch.randint(0, 53, (n + 3,)) for n in lengths]   # prompt + 3 decoded tokens
    P = max(lengths)
    prompts = torch.zeros(3, P, dtype=torch.long)
    valid = torch.zeros(3, P, dtype=torch.bool)
    for b, n in enumerate(lengths):
        prompts[b, P - n:] = seqs[b][:n]
        valid[b, P - n:] = True
    cache = model.make_cache(batch=3, max_len=P + 3)
    pos = padded_positions(valid)
    out = model(prompts, cache=cache, positions=pos, mask=causal_padding_mask(valid))
    steps = [out[:, -1]]
    for s in range(3):
        valid = torch.cat([valid, torch.ones(3, 1, dtype=torch.bool)], 1)
        tok = torch.stack([seqs[b][lengths[b] + s] for b in range(3)])[:, None]
        step = model(tok, cache=cache, positions=pos[:, -1:] + 1 + s, mask=decode_mask(P + s, 1, valid))
        steps.append(step[:, -1])
    for b, n in enumerate(lengths):
        alone = model(seqs[b][None])[0]                       # no padding at all
        got = torch.stack([st[b] for st in steps])
        assert (got - alone[n - 1:]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_embeds_input_and_hidden_states():
    model = tiny()
    ids = torch.randint(0, 53, (2, 6))
    logits, hidden = model(ids, return_hidden=True)
    assert torch.equal(model(embeds=model.tok_embeddings(ids)), logits)
    assert hidden.shape == (2, 6, 32)
    assert torch.equal(model.output(hidden), logits)
    with pytest.raises(QLIPError, match="exactly one"):
        model(ids, embeds=model.tok_embeddings(ids))


@torch.no_grad()
def test_cache_overflow_is_a_clear_error():
    model = tiny()
    cache = model.make_cache(batch=1, max_len=4)
    model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    with pytest.raises(QLIPError, match=r"overflow.*\[4, 5\).*max_len=4"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
