"""CausalTransformer reproduces transformers' Llama (plain and Llama-3 RoPE scaling) and Qwen3
(QK-norm) logits from tiny random models copied through qlip.nn.hf_llama (no download)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402  (a test dependency)

from qlip.nn import (CausalTransformer, causal_lm_config_from_hf, causal_padding_mask,  # noqa: E402
                     padded_positions, rope_inv_freq, state_dict_from_hf)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def hf_model(kind: str):
    torch.manual_seed(0)
    kw = dict(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, initializer_range=0.1, attn_implementation="sdpa")
    if kind == "qwen3":
        cfg = transformers.Qwen3Config(head_dim=16, tie_word_embeddings=True, **kw)
        return transformers.Qwen3ForCausalLM(cfg).eval()
    if kind == "llama3":
        kw["rope_scaling"] = dict(LLAMA3)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()


def ours_from(hf):
    cfg = causal_lm_config_from_hf(hf.config.to_dict())
    model = CausalTransformer(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))   # strict
    return model


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen3"])
@torch.no_grad()
def test_logits_match_transformers(kind):
    hf = hf_model(kind)
    model = ours_from(hf)
    assert model.cfg.qk_norm == (kind == "qwen3")
    assert model.cfg.tie_embeddings == (kind == "qwen3")
    ids = torch.randint(0, 97, (2, 40))
    ref = hf(ids)
    logits, hidden = model(ids, return_hidden=True)
    assert ref.logits.abs().max() > 1.0                   # not a trivially small output
    assert (logits - ref.logits).abs().max().item() <= 1e-5
    last = hf.model(ids).last_hidden_state                # final hidden = after the last norm
    assert (hidden - last).abs().max().item() <= 1e-5


@torch.no_grad()
def test_llama3_scaled_frequencies_equal_transformers():
    hf = hf_model("llama3")
    model = ours_from(hf)
    torch.testing.assert_close(model._inv_freq, hf.model.rotary_emb.inv_freq, rtol=0, atol=0)
    plain = rope_inv_freq(16, 10000.0)
    # the test case exercises all three bands: kept, interpolated and divided by the factor
    ratio = plain / model._inv_freq
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(8.0)
    assert ((ratio > 1.01) & (ratio < 7.99)).any()


@torch.no_grad()
def test_left_padded_batch_matches_transformers():
    hf = hf_model("llama")
    model = ours_from(hf)
    ids = torch.randint(0, 97, (2, 9))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False                                  # second row left-padded by 4
    pos = padded_positions(valid)
    ref = hf(ids, attention_mask=valid.long(), position_ids=pos).logits
    ours = model(ids, positions=pos, mask=causal_padding_mask(valid))
    assert (ours - ref)[valid].abs().max().item() <= 1e-5
