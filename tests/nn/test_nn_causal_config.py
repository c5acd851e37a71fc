"""CausalLMConfig validation, init, FSDP units, tying, grad checkpointing, RMSNorm, HF key mapping."""
import pytest
import torch

from qlip.errors import CheckpointError, ConfigError, QLIPError
from qlip.nn import (CausalLMConfig, CausalTransformer, KVCache, RMSNorm, causal_lm_config_from_hf,
                     state_dict_from_hf)

SMALL = dict(vocab_size=41, dim=32, n_layers=2, n_heads=4, ffn_hidden=40)


@pytest.mark.parametrize("bad, field", [
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(n_kv_heads=0), "n_kv_heads"),
    (dict(n_heads=5), "dim"),
    (dict(head_dim=7), "head_dim"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_layers=1.5), "n_layers"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(rope_scaling={"factor": 0.0}), "factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    (dict(rope_scaling="llama3"), "rope_scaling"),
])
def test_config_validation_names_the_bad_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        CausalLMConfig(**{**SMALL, **bad})


def test_config_validation_runs_again_in_the_model():
    cfg = CausalLMConfig(**SMALL)
    cfg.n_kv_heads = 3
    with pytest.raises(ConfigError, match="n_kv_heads=3 must divide n_heads=4"):
        CausalTransformer(cfg)
    with pytest.raises(ConfigError, match="unknown fields.*hidden_size"):
        CausalLMConfig.from_dict({**SMALL, "hidden_size": 8})
    assert CausalLMConfig.from_dict(SMALL) == CausalLMConfig(**SMALL)


def test_init_fsdp_units_and_tying():
    torch.manual_seed(0)
    model = CausalTransformer(CausalLMConfig(**{**SMALL, "vocab_size": 4000}, n_kv_heads=2, qk_norm=True,
                                             qkv_bias=True, tie_embeddings=True))
    sd = model.state_dict()
    assert model.output.weight is model.tok_embeddings.weight
    assert "output.weight" in sd and "tok_embeddings.weight" in sd
    assert sd["layers.0.attn.k_proj.weight"].shape == (2 * 8, 32)            # GQA: 2 kv heads of 8
    assert sd["layers.1.attn.q_norm.weight"].shape == (8,)
    assert abs(model.tok_embeddings.weight.std().item() - 0.02) < 1e-3
    assert torch.equal(sd["layers.0.attn.q_proj.bias"], torch.zeros(32))
    assert torch.equal(sd["layers.0.attn_norm.weight"], torch.ones(32))
    units = model.fsdp_units()
    assert [name for name, _ in units] == ["layers.0", "layers.1"]
    assert all(m is model.get_submodule(name) for name, m in units)
    n_block = sum(p.numel() for _, m in units for p in m.parameters())
    assert n_block + 4000 * 32 + 32 == sum(p.numel() for p in model.parameters())  # + embedding, norm


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    ids = torch.randint(0, 41, (2, 6))
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)
        model = CausalTransformer(CausalLMConfig(**SMALL, grad_checkpointing=ckpt)).train()
        model(ids).logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_rmsnorm_matches_the_formula_and_dtype_rule():
    norm = RMSNorm(6, eps=1e-5)
    assert torch.equal(norm.weight, torch.ones(6))
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = norm.weight.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x.float()).double(), expected, rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()
    out = norm(xb)   # normalised in float32, rounded to bfloat16, then times the float32 weight
    assert out.dtype == torch.float32
    ref = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16().float()
    assert torch.equal(out, norm.weight * ref)


def test_kv_cache_errors_and_partial_batch():
    cache = KVCache(batch=2, n_kv_heads=2, max_len=5, head_dim=4)
    k = torch.randn(1, 2, 3, 4)
    ks, vs = cache.update(k, k + 1, start=0)
    assert ks.shape == (1, 2, 3, 4) and torch.equal(ks, k) and torch.equal(vs, k + 1) and cache.length == 3
    with pytest.raises(QLIPError, match=r"overflow.*\[3, 6\).*max_len=5"):
        cache.update(k, k, start=3)
    with pytest.raises(QLIPError, match="batch<=2"):
        cache.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4), start=0)


def test_hf_conversion_errors():
    hf = dict(model_type="llama", vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
              intermediate_size=8, rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
              "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg = causal_lm_config_from_hf(hf)                     # the pre-v5 rope_theta / rope_scaling form
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.factor == 8.0 and cfg.kv_heads == 2
    with pytest.raises(ConfigError, match="mistral"):
        causal_lm_config_from_hf({**hf, "model_type": "mistral"})
    with pytest.raises(ConfigError, match="yarn"):
        causal_lm_config_from_hf({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(CheckpointError, match="model.layers.0.self_attn.rotary"):
        state_dict_from_hf({"model.layers.0.self_attn.rotary.weight": torch.zeros(1)}, cfg)
