"""Our ``qlip.nn`` decoder -> a Hugging Face folder (``config.json`` + ``model.safetensors``).

The inverse of :mod:`qlip.nn.hf_llama`'s renaming. Without QK-norm the folder is a
``LlamaForCausalLM``; with QK-norm a ``Qwen3ForCausalLM`` (Qwen3 is Llama plus exactly this
per-head q/k RMSNorm, with ``head_dim`` explicit, untied or tied embeddings and ``attention_bias``
for both q/k/v and o): a trained UM3 then loads in ``transformers`` (``generate``, PEFT) and in
serving engines that know Qwen3, with the extended vocabulary as ordinary rows. Eq. 6's split and
the visual-row constraint of sampling are not part of the HF model: a caller restricts the logits
to ``[0, visual_start)`` or to one visual group itself (``config.json`` records the layout under
``um3_vocab``). Also used to write the tiny random Llama of the tests and the demo without
``transformers``.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Mapping, Optional

import torch

from ..errors import ConfigError
from ..nn import CausalLMConfig

_TOP = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}


def to_hf_name(key: str) -> str:
    if key in _TOP:
        return _TOP[key]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
    if m is None:
        raise ConfigError(f"no Hugging Face name for {key}")
    rest = m.group(2)
    rest = _BLOCK.get(rest, re.sub(r"^attn\.", "self_attn.", rest))
    return f"model.layers.{m.group(1)}.{rest}"


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: CausalLMConfig) -> Dict[str, torch.Tensor]:
    """Our state dict with Hugging Face names (tied embeddings: ``lm_head.weight`` left out, as HF saves)."""
    out = {to_hf_name(k): v.detach().contiguous().cpu() for k, v in sd.items()}
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_config(cfg: CausalLMConfig, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
              **extra: Any) -> Dict[str, Any]:
    """``config.json`` of a ``LlamaForCausalLM`` (no QK-norm) or ``Qwen3ForCausalLM`` (QK-norm)."""
    if cfg.qkv_bias != cfg.out_bias:
        raise ConfigError("Hugging Face Llama/Qwen3 have one attention_bias for q/k/v and o; "
                          f"got qkv_bias={cfg.qkv_bias}, out_bias={cfg.out_bias}")
    qwen = cfg.qk_norm
    if qwen and cfg.mlp_bias:
        raise ConfigError("Qwen3 has no MLP biases (mlp_bias=True cannot be exported with QK-norm)")
    d: Dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen3" if qwen else "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "intermediate_size": cfg.ffn_hidden, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.qkv_bias,
        "initializer_range": cfg.init_std, "torch_dtype": "float32",
    }
    if not qwen:
        d["mlp_bias"] = cfg.mlp_bias
    else:
        d["use_sliding_window"] = False
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        d["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_position_embeddings}
    if bos_id is not None:
        d["bos_token_id"] = int(bos_id)
    if eos_id is not None:
        d["eos_token_id"] = int(eos_id)
    d.update(extra)
    return d


def write_hf(folder: str, sd: Mapping[str, torch.Tensor], cfg: CausalLMConfig, bos_id: Optional[int] = None,
             eos_id: Optional[int] = None, **extra: Any) -> str:
    from ..io import atomic_write_text, write_safetensors
    os.makedirs(folder, exist_ok=True)
    write_safetensors(to_hf_state_dict(sd, cfg), os.path.join(folder, "model.safetensors"))
    atomic_write_text(os.path.join(folder, "config.json"),
                      json.dumps(hf_config(cfg, bos_id, eos_id, **extra), indent=2) + "\n")
    return folder


def export_hf(model, tokenizer, folder: str) -> str:
    """A UM3 model as a Hugging Face Qwen3 (QK-norm) or Llama folder, with its tokenizer."""
    if model.vocab.layout != "subtoken":
        raise ConfigError(f"a UM3 with the {model.vocab.layout!r} layout reads and predicts image tokens through "
                          "its sub-token chain (chain.*), which no Hugging Face Llama / Qwen3 has: only the "
                          "subtoken layout (the paper's) exports")
    lm = {k[len("lm."):]: v for k, v in model.folded_state_dict().items() if k.startswith("lm.")}
    write_hf(folder, lm, model.cfg, model.bos_id, model.eos_id, um3_vocab=model.vocab.to_dict())
    tokenizer.save(folder)
    return folder
