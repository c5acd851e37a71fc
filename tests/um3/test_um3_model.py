"""UM3 started from a Hugging Face Llama: exactly Llama without QK-norm, exactly transformers' Qwen3
attention with it (weights 1), new rows = mean of the text rows, untied embeddings, layout."""
import json

import pytest
import torch

from _um3_utils import BITS, GROUPS, tiny_llama
from qlip.errors import CheckpointError
from qlip.um3.model import bit_signs, bits_extend, from_llama, load_um3, mean_extend, save_um3
from qlip.um3.vocab import UM3Vocab

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "tiny")


def _tokens(seed=0, V=258, shape=(2, 11)):
    return torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed))


def test_without_qk_norm_text_logits_equal_llama(llama):
    hf = transformers.LlamaForCausalLM.from_pretrained(llama).eval()
    model, tok = from_llama(llama, bits=BITS, groups=GROUPS, qk_norm=False)
    x = _tokens()
    with torch.no_grad():
        ours, want = model(x)[..., :model.vocab.text_size], hf(x).logits
    assert model.vocab.text_size == 258 and model.vocab.size == 258 + 2 + 2 * 16
    assert (ours - want).abs().max() < 1e-5


@pytest.mark.parametrize("extra", [{"attention_bias": True},
                                   {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 64}}])
def test_llama_variants_still_equal(tmp_path, extra):
    """Attention biases (HF attention_bias) and Llama-3.1 rope scaling map one to one."""
    folder = tiny_llama(tmp_path / "v", tie_embeddings=False, **extra)  # random biases, norms
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    model, _ = from_llama(folder, bits=BITS, groups=GROUPS, qk_norm=False)
    x = _tokens(1, shape=(1, 90))  # beyond original_max_position_embeddings
    with torch.no_grad():
        assert (model(x)[..., :258] - hf(x).logits).abs().max() < 1e-5


def test_qk_norm_equals_transformers_qwen3_attention(llama):
    """Our QK-norm (weights 1) on Llama weights == Qwen3ForCausalLM with the same weights, and it
    changes the logits (a QK-norm model is not Llama)."""
    cfg = json.load(open(f"{llama}/config.json"))
    shape = {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "intermediate_size", "rms_norm_eps")}
    q = transformers.Qwen3Config(**shape, head_dim=cfg["hidden_size"] // cfg["num_attention_heads"],
                                 rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=256)
    qwen = transformers.Qwen3ForCausalLM(q).eval()
    llama_sd = transformers.LlamaForCausalLM.from_pretrained(llama).state_dict()
    missing, unexpected = qwen.load_state_dict(llama_sd, strict=False)
    assert not unexpected and missing and all(k.endswith(("q_norm.weight", "k_norm.weight")) for k in missing)
    with torch.no_grad():
        for k in missing:
            qwen.get_parameter(k).fill_(1.0)
    model, _ = from_llama(llama, bits=BITS, groups=GROUPS, qk_norm=True)
    plain, _ = from_llama(llama, bits=BITS, groups=GROUPS, qk_norm=False)
    x = _tokens(2)
    with torch.no_grad():
        ours = model(x)[..., :258]
        assert (ours - qwen(x).logits).abs().max() < 1e-5
        assert (ours - plain(x)[..., :258]).abs().max() > 1e-3
    norms = [p for n, p in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 4 and all(bool((p == 1).all()) for p in norms)


def test_new_rows_are_the_mean_of_the_text_rows_and_embeddings_are_untied(llama):
    model, _ = from_llama(llama, bits=BITS, groups=GROUPS)
    hf = transformers.LlamaForCausalLM.from_pretrained(llama)
    assert hf.config.tie_word_embeddings
    E = hf.model.embed_tokens.weight.detach()
    V_t = E.shape[0]
    for w in (model.lm.tok_embeddings.weight, model.lm.output.weight):
        assert torch.equal(w[:V_t], E)
        want = E.double().sum(0) / V_t                         # e_i = (sum_j e_j) / V_t for i > V_t
        assert torch.allclose(w[V_t:].double(), want.expand(model.vocab.added, -1), atol=1e-7)
    assert model.lm.output.weight.data_ptr() != model.lm.tok_embeddings.weight.data_ptr()
    with torch.no_grad():
        model.lm.output.weight[0, 0] += 1.0
    assert model.lm.tok_embeddings.weight[0, 0] != model.lm.output.weight[0, 0]
    assert not model.cfg.tie_embeddings


def test_export_is_a_standard_hf_qwen3_model(llama, tmp_path):
    """A UM3 (QK-norm, extended vocabulary) exports as a Qwen3ForCausalLM with equal logits over all rows."""
    from qlip.um3.hf_export import export_hf
    model, tok = from_llama(llama, bits=BITS, groups=GROUPS)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
    export_hf(model, tok, str(tmp_path / "hf"))
    qwen = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(qwen).__name__ == "Qwen3ForCausalLM"
    x = _tokens(4, V=model.vocab.size)
    with torch.no_grad():
        assert (model.eval()(x) - qwen(x).logits).abs().max() < 1e-5


def test_mean_extend_keeps_rows_and_dtype():
    w = torch.randn(5, 3, dtype=torch.bfloat16)
    out = mean_extend(w, 2)
    assert out.dtype == torch.bfloat16 and torch.equal(out[:5], w) and torch.equal(out[5], out[6])


def test_bits_init_adds_a_fixed_projection_of_each_rows_bits(llama):
    """visual_init="bits": text rows untouched, <boi>/<eoi> the mean, each group's visual rows the
    mean plus an exact linear function of the +-1 bits of their sub-token value, at the text rows'
    scale, the same on every call; the paper's mean init stays the default."""
    model, _ = from_llama(llama, bits=BITS, groups=GROUPS, visual_init="bits")
    E = transformers.LlamaForCausalLM.from_pretrained(llama).model.embed_tokens.weight.detach().double()
    v = model.vocab
    mean = E.mean(0)
    for w in (model.lm.tok_embeddings.weight.detach().double(), model.lm.output.weight.detach().double()):
        assert torch.equal(w[:v.text_size], E)
        assert torch.allclose(w[v.boi], mean, atol=1e-6) and torch.allclose(w[v.eoi], mean, atol=1e-6)
        S = bit_signs(v.visual.group_bits)
        for g in range(v.groups):
            start = v.visual.group_start(g)
            rows = w[start:start + v.visual.group_size] - mean
            coef = torch.linalg.lstsq(S, rows).solution          # rows = S @ coef exactly
            assert (S @ coef - rows).abs().max() < 1e-5
            assert 0.3 < float(rows.std() / E.std()) < 3.0
        assert not torch.allclose(w[v.visual_start], w[v.visual_start + 1])
    again, _ = from_llama(llama, bits=BITS, groups=GROUPS, visual_init="bits")
    assert torch.equal(again.lm.tok_embeddings.weight, model.lm.tok_embeddings.weight)
    assert torch.equal(bits_extend(E.float(), v), model.lm.tok_embeddings.weight)
    with pytest.raises(CheckpointError, match="visual_init must be one of mean, bits"):
        from_llama(llama, bits=BITS, groups=GROUPS, visual_init="random")


def test_vocabulary_layout():
    v = UM3Vocab(text_size=128256)
    assert (v.boi, v.eoi, v.visual_start) == (128256, 128257, 128258)
    assert v.added == 2 + 2 * 16384 and v.size == 128258 + 32768
    ids = torch.tensor([[0, (1 << 28) - 1, (5 << 14) | 7]])
    rows = v.image_seq(ids)
    assert rows.tolist() == [[128258, 128258 + 16384, 128258 + 16383, 128258 + 32767,
                              128258 + 5, 128258 + 16384 + 7]]
    assert torch.equal(v.visual.decode(rows), ids)


def test_save_load_roundtrip_and_errors(llama, tmp_path):
    model, tok = from_llama(llama, bits=BITS, groups=GROUPS)
    save_um3(model, tok, str(tmp_path / "m"))
    back, tok2 = load_um3(str(tmp_path / "m"))
    x = _tokens(3, V=model.vocab.size)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), back(x))
    assert back.vocab == model.vocab and tok2.encode("a b") == tok.encode("a b")
    with pytest.raises(CheckpointError, match="not a UM3 model"):
        load_um3(llama)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(open(f"{llama}/config.json").read())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_llama(str(tmp_path / "empty"))


def _with_random_visual_bits(llama, seed=0):
    model, tok = from_llama(llama, bits=BITS, groups=GROUPS, visual_bits=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (model.visual_bits.inp, model.visual_bits.out):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval(), tok


def test_visual_bits_start_at_zero_and_change_only_visual_rows(llama):
    """visual_bits=True: at the start the same logits as the plain model (the vectors are zero);
    with vectors, a visual token's embedding and output row are its row plus s(v) A_g / k and
    s(v) B_g / k (k = bits per group), computed here directly from the bits; text tokens and text rows are untouched."""
    plain, _ = from_llama(llama, bits=BITS, groups=GROUPS)
    fresh, _ = from_llama(llama, bits=BITS, groups=GROUPS, visual_bits=True)
    x = _tokens(5, V=plain.vocab.size, shape=(2, 13))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), plain.eval()(x))
    model, _ = _with_random_visual_bits(llama)
    v, vb = model.vocab, model.visual_bits
    E, W = model.lm.tok_embeddings.weight.detach(), model.lm.output.weight.detach()
    with torch.no_grad():
        emb = vb.embed(model.lm.tok_embeddings(x), x)
        wout = model.output_weight()
    gb = v.visual.group_bits
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            row = int(x[b, t])
            want = E[row].clone()
            if row >= v.visual_start:
                g, val = divmod(row - v.visual_start, v.visual.group_size)
                s = torch.tensor([((val >> k) & 1) * 2 - 1 for k in range(gb)], dtype=torch.float32)
                want += s @ vb.inp[g].detach() / gb
            assert torch.allclose(emb[b, t], want, atol=1e-6)
    assert torch.equal(wout[:v.visual_start], W[:v.visual_start])
    g, val = 1, 5
    s = torch.tensor([((val >> k) & 1) * 2 - 1 for k in range(gb)], dtype=torch.float32)
    row = v.visual.group_start(g) + val
    assert torch.allclose(wout[row], W[row] + s @ vb.out[g].detach() / gb, atol=1e-6)


def test_visual_bits_fold_into_a_plain_model_and_train(llama, tmp_path):
    """Saved models fold the vectors into the rows: load_um3 gives a plain UM3 with the same
    logits, and so does the Hugging Face export; from the paper's mean init (all visual rows
    equal) the loss has a gradient on the vectors, so they tell visual tokens apart at once."""
    from qlip.um3.hf_export import export_hf
    model, tok = _with_random_visual_bits(llama)
    x = _tokens(6, V=model.vocab.size, shape=(2, 9))
    save_um3(model, tok, str(tmp_path / "m"))
    loaded, _ = load_um3(str(tmp_path / "m"))
    assert loaded.visual_bits is None
    assert not any(k.startswith("visual_bits") for k in loaded.state_dict())
    with torch.no_grad():
        want = model(x)
        assert (loaded(x) - want).abs().max() < 1e-5
        assert (loaded.next_logits(x) - model.next_logits(x)).abs().max() < 1e-5
    export_hf(model, tok, str(tmp_path / "hf"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (hf(x).logits - want).abs().max() < 1e-5
    fresh, _ = from_llama(llama, bits=BITS, groups=GROUPS, visual_bits=True)
    v = fresh.vocab
    img = torch.tensor([[1, v.boi] + list(range(v.visual_start, v.visual_start + 6)) + [v.eoi, 2]])
    fresh.nll(img[:, :-1], img[:, 1:]).sum().backward()
    assert fresh.visual_bits.inp.grad.abs().sum() > 0 and fresh.visual_bits.out.grad.abs().sum() > 0
