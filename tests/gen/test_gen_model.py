"""qlip.gen model and heads on tiny sizes: losses against a direct computation over a 6-bit
vocabulary, per-head CFG against guidance on the explicit joint, KV-cached == uncached sampling,
cfg = 1 == conditional sampling, rotary tables of the prefix and the 2-D grid."""
import pytest
import torch

from qlip.errors import ConfigError
from qlip.gen.heads import BitwiseHead, IntraTokenHead, SplitHead, bits_to_ids, ids_to_bits
from qlip.gen.model import PRESETS, GenConfig, T2IModel, rope_tables

BITS = 6  # 2 x 3 bits: 64 ids, small enough to enumerate


def _head(kind, dim=8):
    torch.manual_seed(0)
    h = {"split": lambda: SplitHead(dim, BITS, 2), "bitwise": lambda: BitwiseHead(dim, BITS),
         "intra": lambda: IntraTokenHead(dim, BITS), "intra3": lambda: IntraTokenHead(dim, BITS, 3)}[kind]()
    for p in h.parameters():  # larger weights: distributions far from uniform
        torch.nn.init.normal_(p, std=0.7)
    return h


def joint_logprobs(head, hidden):
    """(B, 64) log p(id | hidden) built from the head's factors by brute force over all ids."""
    ids = torch.arange(2 ** BITS)
    if isinstance(head, SplitHead):
        lp = head.logits(hidden).log_softmax(-1)                                 # (B, 2, 8)
        return lp[:, 0, ids >> 3] + lp[:, 1, ids & 7]
    if isinstance(head, BitwiseHead):
        lp = head.logits(hidden).log_softmax(-1)                                 # (B, 6, 2)
        bits = ids_to_bits(ids, BITS)                                            # (64, 6)
        return sum(lp[:, j, bits[:, j]] for j in range(BITS))
    # intra: the chain rule over the G sub-tokens, each factor given the earlier ones
    G, gb = head.groups, BITS // head.groups
    subs = torch.stack([(ids >> (gb * (G - 1 - k))) & ((1 << gb) - 1) for k in range(G)], -1)    # (64, G)
    B = hidden.shape[0]
    out = torch.zeros(B, 2 ** BITS)
    for i in range(2 ** BITS):
        prev = subs[i].expand(B, -1)
        out[:, i] = sum(head.factor_logits(k, hidden, prev).log_softmax(-1)[:, subs[i, k]] for k in range(G))
    return out


@pytest.mark.parametrize("kind", ["split", "bitwise", "intra", "intra3"])
def test_head_loss_is_the_nll_of_the_joint_distribution(kind):
    head = _head(kind)
    hidden = torch.randn(5, 3, 8)
    ids = torch.randint(0, 2 ** BITS, (5, 3))
    joint = joint_logprobs(head, hidden.flatten(0, 1)).view(5, 3, -1)
    assert torch.allclose(joint.exp().sum(-1), torch.ones(5, 3), atol=1e-5)  # a distribution over the 64 ids
    direct = -joint.gather(-1, ids[..., None]).mean()
    assert torch.allclose(head.loss(hidden, ids), direct, atol=1e-5)
    emb = head.embed(ids)
    assert emb.shape == (5, 3, 8)
    assert not torch.allclose(emb[0, 0], head.embed(ids[:1, :1] ^ 1)[0, 0])  # the lowest bit changes the input


@pytest.mark.parametrize("kind", ["split", "bitwise"])
def test_per_head_cfg_is_exact_guidance_on_the_joint(kind):
    """Empirical distribution of head.sample with cfg s vs softmax(l_u + s (l_c - l_u)) over the 64 ids."""
    head = _head(kind)
    hc, hu, s = torch.randn(1, 8), torch.randn(1, 8), 2.5
    target = (joint_logprobs(head, hu) + s * (joint_logprobs(head, hc) - joint_logprobs(head, hu))).softmax(-1)[0]
    n = 40000
    g = torch.Generator().manual_seed(0)
    draws = head.sample(hc.expand(n, -1), hu.expand(n, -1), cfg=s, generator=g)
    freq = torch.bincount(draws, minlength=64).float() / n
    assert (freq - target).abs().max() < 0.012


@pytest.mark.parametrize("kind", ["intra", "intra3"])
def test_intra_head_guides_each_sub_token_given_the_same_earlier_ones(kind):
    head = _head(kind)
    gb = BITS // head.groups
    hc, hu, s = torch.randn(1, 8), torch.randn(1, 8), 2.0
    n = 30000
    draws = head.sample(hc.expand(n, -1), hu.expand(n, -1), cfg=s, generator=torch.Generator().manual_seed(1))
    none = torch.zeros(1, 0, dtype=torch.long)
    l0c, l0u = head.factor_logits(0, hc, none), head.factor_logits(0, hu, none)
    p0 = (l0u + s * (l0c - l0u)).softmax(-1)[0]
    first = draws >> (BITS - gb)
    assert (torch.bincount(first, minlength=2 ** gb).float() / n - p0).abs().max() < 0.015
    s0 = int(p0.argmax())
    lc, lu = head.factor_logits(1, hc, torch.tensor([[s0]])), head.factor_logits(1, hu, torch.tensor([[s0]]))
    p1 = (lu + s * (lc - lu)).softmax(-1)[0]
    sel = (draws[first == s0] >> (BITS - 2 * gb)) & ((1 << gb) - 1)
    assert (torch.bincount(sel, minlength=2 ** gb).float() / len(sel) - p1).abs().max() < 0.03


def test_intra_head_reads_generators_saved_with_the_two_half_names():
    from qlip.gen.heads import upgrade_state_dict
    model = _tiny("intra")
    sd = model.state_dict()
    assert "head.chain.prev.0.weight" in sd
    # the chain's modules directly on the head (before IntraChain)
    flat = {k.replace("head.chain.", "head."): v for k, v in sd.items()}
    # the two-half names (before the head took groups)
    old = {k.replace("head.outputs.0.", "head.out_hi.").replace("head.outputs.1.", "head.out_lo.")
            .replace("head.prev.0.", "head.hi_cond.").replace("head.norms.0.", "head.lo_norm.")
            .replace("head.mlps.0.", "head.lo_mlp."): v for k, v in flat.items()}
    assert "head.out_hi.weight" in old and "head.lo_mlp.0.weight" in old and "head.mlps.0.0.weight" in flat
    for saved in (flat, old):
        up = upgrade_state_dict(saved)
        assert up.keys() == sd.keys() and all(torch.equal(up[k], sd[k]) for k in sd)


def test_bits_round_trip_msb_first():
    ids = torch.tensor([0, 1, 5, 63, 2 ** 27 + 3])
    b = ids_to_bits(ids, 28)
    assert b[2, -3:].tolist() == [1, 0, 1] and b[4, 0] == 1
    assert torch.equal(bits_to_ids(b), ids)


def _tiny(head="split", **kw):
    torch.manual_seed(0)
    if head == "intra3":
        head, kw = "intra", {**kw, "groups": 3}
    cfg = GenConfig.from_preset("gpt-tiny", bits=BITS, grid_h=3, grid_w=4, text_dim=12, text_len=5, head=head, **kw)
    model = T2IModel(cfg).eval()
    for p in model.head.parameters():
        torch.nn.init.normal_(p, std=0.3)  # a non-uniform model: samples depend on the sequence
    return model


@pytest.mark.parametrize("head", ["split", "bitwise", "intra", "intra3"])
def test_kv_cached_sampling_equals_uncached(head):
    model = _tiny(head)
    feats = torch.randn(3, 5, 12)
    for kw in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 5, "top_p": 0.9}):
        for cfg, interval in ((1.0, -1), (3.0, -1), (3.0, 5)):  # 5: the null rows leave after token 5
            a = model.generate(feats, cfg=cfg, cfg_interval=interval, generator=torch.Generator().manual_seed(7), **kw)
            b = model.generate(feats, cfg=cfg, cfg_interval=interval, generator=torch.Generator().manual_seed(7),
                               use_cache=False, **kw)
            assert a.shape == (3, 3, 4) and torch.equal(a, b), (head, kw, cfg, interval)
    greedy = model.generate(feats, temperature=0.0)
    assert len(set(greedy.flatten().tolist())) > 3  # not a constant sequence


def test_cfg_one_is_conditional_sampling_and_guidance_changes_it():
    """cfg = 1 == a reference loop that runs only the conditional sequence, step by step."""
    model = _tiny("split")
    feats = torch.randn(2, 5, 12)
    got = model.generate(feats, cfg=1.0, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    seq = model.cond(feats)
    ids = []
    for t in range(12):
        h = model.backbone.forward_hidden(embeds=seq, rope=model.rope(0, seq.shape[1], seq.device))[:, -1]
        nxt = model.head.sample(h, None, 1.0, 1.0, None, None, g)
        ids.append(nxt)
        seq = torch.cat([seq, model.head.embed(nxt[:, None])], 1)
    assert torch.equal(got, torch.stack(ids, 1).view(2, 3, 4))
    guided = model.generate(feats, cfg=4.0, generator=torch.Generator().manual_seed(3))
    assert not torch.equal(got, guided)
    # cfg_interval 0 guides no token: conditional sampling again
    assert torch.equal(model.generate(feats, cfg=4.0, cfg_interval=0, generator=torch.Generator().manual_seed(3)), got)
    # cfg_interval 4: the first 4 tokens as fully guided sampling, the rest differs (conditional from there on)
    part = model.generate(feats, cfg=4.0, cfg_interval=4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(part.flatten(1)[:, :4], guided.flatten(1)[:, :4]) and not torch.equal(part, guided)


def test_training_loss_uses_teacher_forcing_and_the_null_condition():
    model = _tiny("split")
    feats, ids = torch.randn(2, 5, 12), torch.randint(0, 64, (2, 12))
    loss = model(feats, ids)
    h = model.hidden(model.cond(feats), ids)
    assert h.shape == (2, 12, 32) and torch.allclose(loss, model.head.loss(h, ids))
    # dropped captions see only the null prefix: their loss does not depend on the features
    drop = torch.tensor([True, True])
    assert torch.equal(model(feats, ids, drop), model(torch.randn(2, 5, 12), ids, drop))
    # causality: the hidden state predicting token t does not depend on tokens >= t
    ids2 = ids.clone()
    ids2[:, 7:] = (ids2[:, 7:] + 1) % 64
    h2 = model.hidden(model.cond(feats), ids2)
    assert torch.allclose(h[:, :8], h2[:, :8], atol=1e-6) and not torch.allclose(h[:, 8], h2[:, 8])


def test_gradient_of_a_batch_is_the_mean_of_its_halves():
    """What 2 ranks == 1 process rests on (tests/gen/test_gen_train.py): the loss is a mean over
    samples of equally many tokens, and a dropped caption's prefix depends only on its own row, so
    the gradient of 8 samples is the average of the gradients of its two halves. In float64 they
    agree to 1e-12 relative: what is left in float32 is the order of sums."""
    model = _tiny("split").double()
    feats, ids = torch.randn(8, 5, 12, dtype=torch.float64), torch.randint(0, 64, (8, 12))
    drop = torch.tensor([True, False, False, False, False, True, False, False])

    def grads(sl):
        model.zero_grad()
        model(feats[sl], ids[sl], drop[sl]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, a, b = grads(slice(0, 8)), grads(slice(0, 4)), grads(slice(4, 8))
    assert full.keys() == a.keys() and "cond.null" in full
    for n in full:
        assert torch.allclose(full[n], (a[n] + b[n]) / 2, rtol=1e-12, atol=1e-15), n


def test_rope_tables_identity_prefix_and_2d_grid():
    cfg = GenConfig.from_preset("gpt-tiny", grid_h=3, grid_w=4, text_len=5, text_dim=4)
    cos, sin = rope_tables(cfg)
    D = 8
    assert cos.shape == (5 + 12, D)
    assert torch.equal(cos[:5], torch.ones(5, D)) and torch.equal(sin[:5], torch.zeros(5, D))
    # image token t = (r, c): first quarter of the angles follow the row, second the column
    r, c = divmod(6, 4)
    ang = torch.atan2(sin[5 + 6, :D // 2], cos[5 + 6, :D // 2])
    assert torch.allclose(ang, torch.tensor([r * 1.0, r * 0.01, c * 1.0, c * 0.01]), atol=1e-5)
    zc, zs = rope_tables(GenConfig.from_preset("gpt-tiny", grid_h=3, grid_w=4, text_len=5, text_dim=4,
                                               prefix_rope="zero"))
    assert torch.equal(zc[:5], torch.zeros(5, D)) and torch.equal(zc[5:], cos[5:])


def test_presets_have_llamagen_sizes_and_bad_configs_fail():
    assert {k: (v["n_layers"], v["dim"], v["n_heads"]) for k, v in PRESETS.items() if k.startswith("gpt-") and
            k[4:] in ("b", "l", "xl")} == {"gpt-b": (12, 768, 12), "gpt-l": (24, 1024, 16), "gpt-xl": (36, 1280, 20)}
    assert PRESETS["gpt-xl"]["ffn_hidden"] == 3584  # LlamaGen: 2/3 * 4 * 1280 rounded up to 256
    with pytest.raises(ConfigError, match="head must be one of"):
        GenConfig(head="flat")
    with pytest.raises(ConfigError, match="divisible by 4"):
        GenConfig(dim=24, n_heads=4)
    with pytest.raises(ConfigError, match="unknown generator preset"):
        GenConfig.from_preset("gpt-xxl")

