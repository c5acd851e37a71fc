"""UM3's ``token`` layout (one sequence position per QLIP token, sub-tokens by the in-position chain):
the embedding is the sum of the sub-token rows, the loss is the chain rule written out by hand
(split and joint), guided drawing is per factor and the KV cache changes nothing, it saves and
loads, trains through the engine and refuses the Hugging Face export."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _um3_utils import BITS, GRID, GROUPS, image_ids, tiny_llama
from qlip.errors import ConfigError, DataError
from qlip.um3.generate import Sampling, caption, draw
from qlip.um3.loss import IGNORE
from qlip.um3.model import from_llama, load_um3, save_um3
from qlip.um3.vocab import UM3Vocab

GB = BITS // GROUPS


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    m, tok = from_llama(tiny_llama(tmp_path_factory.mktemp("t") / "tiny"), bits=BITS, groups=GROUPS,
                        layout="token", visual_init="bits")
    with torch.no_grad():  # make the visual rows distinct and the output layer decisive for the test
        m.lm.output.weight[m.vocab.text_size:].normal_(0, 0.5)
    return m.eval(), tok


def test_vocab_token_layout_sequence_round_trip():
    v = UM3Vocab(text_size=10, bits=BITS, groups=GROUPS, layout="token")
    ids = torch.tensor([[[0, 255], [17, 128]]])
    seq = v.image_seq(ids)
    assert seq.tolist() == [[12, 267, 29, 140]] and v.per_token == 1
    assert torch.equal(v.image_ids(seq), ids.view(1, -1))
    assert UM3Vocab.from_dict(v.to_dict()) == v
    assert UM3Vocab.from_dict({"text_size": 10, "bits": 8, "groups": 2}).layout == "subtoken"  # older configs
    with pytest.raises(DataError, match="token ids must lie"):
        v.image_seq(torch.tensor([[256]]))
    with pytest.raises(ConfigError, match="layout"):
        UM3Vocab(text_size=10, layout="pixels")


def test_embedding_is_the_sum_of_the_sub_token_rows(model):
    m, _ = model
    v = m.vocab
    ids = torch.tensor([5, 200])
    tokens = torch.tensor([[m.bos_id, v.boi, int(ids[0]) + v.visual_start, int(ids[1]) + v.visual_start, v.eoi]])
    e = m.embed(tokens)
    E = m.lm.tok_embeddings.weight
    for j, i in enumerate(ids.tolist()):
        hi, lo = i >> GB, i & ((1 << GB) - 1)
        want = E[v.visual.group_start(0) + hi] + E[v.visual.group_start(1) + lo]
        assert torch.allclose(e[0, 2 + j], want, atol=1e-6)
    assert torch.allclose(e[0, 0], E[m.bos_id]) and torch.allclose(e[0, 4], E[v.eoi])


@pytest.mark.parametrize("softmax", ["split", "joint"])
def test_nll_is_the_chain_rule_written_out(model, softmax):
    m, tok = model
    v = m.vocab
    start, gs = v.visual_start, v.visual.group_size
    img = v.image_seq(torch.from_numpy(image_ids(2, 1)).long()[None])[0].tolist()
    seq = torch.tensor([[m.bos_id] + tok.encode("a red circle") + [v.boi] + img + [v.eoi]])
    x, y = seq[:, :-1], seq[:, 1:].clone()
    y[0, :2] = IGNORE
    with torch.no_grad():
        got = m.nll(x, y, softmax)
        h = m.hidden(x)[0]
        W = m.output_weight()
        want = torch.zeros(y.shape[1])
        for t, target in enumerate(y[0].tolist()):
            if target == IGNORE:
                continue
            first = W[:start] if softmax == "split" else W[:start + gs]
            if target < start:
                want[t] = -F.linear(h[t], first).log_softmax(-1)[target]
                continue
            i = target - start
            s = [i >> GB, i & (gs - 1)]
            # factor 0 over group 0 (split) or text + group 0 (joint), from h itself
            l0 = F.linear(h[t], W[start:start + gs]) if softmax == "split" else F.linear(h[t], first)
            n0 = -l0.log_softmax(-1)[s[0] + (0 if softmax == "split" else start)]
            # factor 1: c = h + P_0(s_0), x = c + MLP(norm(c)), over group 1's rows
            c = h[t] + m.chain.prev[0].weight[s[0]]
            xk = c + m.chain.mlps[0](m.chain.norms[0](c))
            lo = v.visual.group_start(1)
            n1 = -F.linear(xk, W[lo:lo + gs]).log_softmax(-1)[s[1]]
            want[t] = n0 + n1
    assert (got[0, :2] == 0).all() and (got[0, 2:] > 0).all()
    assert torch.allclose(got[0], want, atol=1e-5)


def test_guided_drawing_is_cached_exact_and_guided_per_factor(model):
    m, tok = model
    g = Sampling(temperature=1.0, seed=3, cfg_scale=3.0)
    caps = ["a blue circle", "a red square"]
    a = draw(m, tok, caps, GRID, g)
    assert torch.equal(a, draw(m, tok, caps, GRID, g, use_cache=False))
    assert a.shape == (2, *GRID) and int(a.max()) < (1 << BITS)
    # greedy, CFG 1: each token is the argmax chain of the conditional model (hand-rolled here)
    greedy = draw(m, tok, ["a blue circle"], GRID, Sampling(temperature=0.0))
    v = m.vocab
    seq = torch.tensor([[m.bos_id] + tok.encode("a blue circle") + [v.boi]])
    W, gs = m.output_weight(), v.visual.group_size
    out = []
    with torch.no_grad():
        for _ in range(GRID[0] * GRID[1]):
            h = m.hidden(seq)[0, -1]
            s0 = int(F.linear(h, W[v.visual.group_start(0):][:gs]).argmax())
            c = h + m.chain.prev[0].weight[s0]
            xk = c + m.chain.mlps[0](m.chain.norms[0](c))
            s1 = int(F.linear(xk, W[v.visual.group_start(1):][:gs]).argmax())
            out.append((s0 << GB) | s1)
            seq = torch.cat([seq, torch.tensor([[out[-1] + v.visual_start]])], 1)
    assert greedy.flatten().tolist() == out
    # guidance: factor 0 at a large scale follows the conditional-minus-unconditional direction
    s = Sampling(temperature=0.0, cfg_scale=4.0)
    guided = draw(m, tok, ["a blue circle"], GRID, s)
    with torch.no_grad():
        hc = m.hidden(torch.tensor([[m.bos_id] + tok.encode("a blue circle") + [v.boi]]))[0, -1]
        hu = m.hidden(torch.tensor([[m.bos_id, v.boi]]))[0, -1]
        W0 = W[v.visual.group_start(0):][:gs]
        lc, lu = F.linear(hc, W0).log_softmax(-1), F.linear(hu, W0).log_softmax(-1)
    assert int(guided.flatten()[0]) >> GB == int((lu + 4.0 * (lc - lu)).argmax())


def test_captions_read_one_position_per_token(model):
    m, tok = model
    img = torch.from_numpy(np.stack([image_ids(1, 0), image_ids(2, 1)])).long().view(2, *GRID)
    s = Sampling(temperature=1.0, seed=5)
    assert caption(m, tok, img, max_new=8, sampling=s) == caption(m, tok, img, max_new=8, sampling=s, use_cache=False)


def test_save_load_round_trip_and_no_hf_export(model, tmp_path):
    from qlip.um3.hf_export import export_hf
    m, tok = model
    save_um3(m, tok, str(tmp_path / "saved"))
    m2, _ = load_um3(str(tmp_path / "saved"))
    assert m2.vocab.layout == "token" and m2.chain is not None
    x = torch.tensor([[m.bos_id, m.vocab.boi, m.vocab.visual_start + 77, m.vocab.visual_start + 3]])
    with torch.no_grad():
        assert torch.equal(m.next_logits(x), m2.next_logits(x))
    with pytest.raises(ConfigError, match="layout"):
        export_hf(m, tok, str(tmp_path / "hf"))


def test_a_batch_without_image_targets_still_gives_the_chain_zero_gradients(model):
    """Every rank must reduce the same parameters (FSDP / DDP): a text-only micro-batch leaves the
    chain's gradients at zero, not None."""
    m, tok = model
    x = torch.tensor([[m.bos_id] + tok.encode("a red circle")])
    m.zero_grad(set_to_none=True)
    m.nll(x[:, :-1], x[:, 1:], "split").sum().backward()
    grads = [p.grad for p in m.chain.parameters()]
    assert all(g is not None and float(g.abs().max()) == 0 for g in grads)
    m.zero_grad(set_to_none=True)
