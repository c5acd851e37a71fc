"""Hugging Face Llama / Qwen3 checkpoints -> :class:`qlip.nn.causal_transformer.CausalTransformer`.

Works on plain dicts (a ``config.json`` and a state dict), so ``transformers`` is not needed:

    cfg = causal_lm_config_from_hf(json.load(open("config.json")))
    model = CausalTransformer(cfg)
    model.load_state_dict(state_dict_from_hf(safetensors_state_dict, cfg))

Hugging Face stores q/k projections for the rotate-half RoPE used here, so the weights copy one to
one (only the names change). Supported: ``model_type`` ``llama`` and ``qwen3`` (``qwen3`` turns on
QK-norm), RoPE ``default`` or ``llama3``, ``silu`` activation, no sliding window.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Mapping

import torch

from ..errors import CheckpointError, ConfigError
from .causal_transformer import CausalLMConfig

_SUPPORTED = ("llama", "qwen3")

# Hugging Face name -> ours, outside the blocks
_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
# inside block i: "model.layers.{i}." + Hugging Face name -> "layers.{i}." + ours
_BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    **{f"self_attn.{p}.{t}": f"attn.{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
       for t in ("weight", "bias")},
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    **{f"mlp.{p}.{t}": f"mlp.{p}.{t}" for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "bias")},
}


def causal_lm_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> CausalLMConfig:
    """A :class:`CausalLMConfig` from a Hugging Face config dict (``config.json`` or
    ``PretrainedConfig.to_dict()``; old ``rope_theta``/``rope_scaling`` and new
    ``rope_parameters`` forms). ``overrides`` replace fields of the result."""
    model_type = hf.get("model_type", "llama")
    if model_type not in _SUPPORTED:
        raise ConfigError(f"model_type {model_type!r} is not supported; expected one of {_SUPPORTED}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("use_sliding_window", False):
        raise ConfigError("sliding-window attention (use_sliding_window=True) is not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ConfigError(f"RoPE type {kind!r} is not supported (default or llama3)")
    bias = bool(hf.get("attention_bias", False))
    cfg = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
        head_dim=hf.get("head_dim"), ffn_hidden=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=rope if kind == "llama3" else None,
        qk_norm=model_type == "qwen3", qkv_bias=bias, out_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
    )
    cfg.update(overrides)
    return CausalLMConfig(**cfg)


def _rename(key: str) -> str:
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
    if m is None or m.group(2) not in _BLOCK:
        raise CheckpointError(f"unexpected key in a Hugging Face Llama/Qwen3 state dict: {key}")
    return f"layers.{m.group(1)}.{_BLOCK[m.group(2)]}"


def state_dict_from_hf(sd: Mapping[str, torch.Tensor], cfg: CausalLMConfig) -> Dict[str, torch.Tensor]:
    """Rename a Hugging Face ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` state dict to ours.

    Rotary ``inv_freq`` buffers of old checkpoints are dropped. With tied embeddings a missing
    ``lm_head.weight`` is filled with the embedding (our state dict lists both names).
    """
    out = {_rename(k): v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "output.weight" not in out and "tok_embeddings.weight" in out:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out
