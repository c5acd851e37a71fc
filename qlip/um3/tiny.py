"""A tiny random Llama-3 checkpoint in Hugging Face format, made locally (no download, no
``transformers``): the starting point of the tests and the demo. A :class:`qlip.nn.CausalTransformer`
in the Llama-3 layout (RMSNorm, SwiGLU, GQA, RoPE theta 5e5, tied embeddings as Llama 3.2) with
random ``N(0, 0.02)`` weights, written as a ``LlamaForCausalLM`` folder (``config.json`` +
``model.safetensors``, :mod:`qlip.um3.hf_export`) next to the byte-level ``tokenizer.json`` of
:func:`qlip.um3.text.make_byte_tokenizer` (258 ids). ``transformers.LlamaForCausalLM.from_pretrained``
loads it (tested).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..nn import CausalLMConfig, CausalTransformer
from .hf_export import write_hf
from .text import TextTokenizer, make_byte_tokenizer


def make_tiny_llama(folder: str, dim: int = 64, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
                    ffn_hidden: int = 128, max_seq_len: int = 2048, seed: int = 0, tie_embeddings: bool = True,
                    attention_bias: bool = False, rope_scaling: Any = None,
                    tokenizer: Optional[TextTokenizer] = None) -> str:
    """Write the checkpoint to ``folder`` and return it. ``rope_scaling``: a Llama-3.1 scaling dict
    (``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
    ``tokenizer``: another text tokenizer (e.g. :func:`qlip.um3.text.train_byte_bpe`; default bytes)."""
    tok = tokenizer if tokenizer is not None else make_byte_tokenizer()
    cfg = CausalLMConfig(vocab_size=tok.size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         ffn_hidden=ffn_hidden, max_seq_len=max_seq_len, rope_theta=500000.0, norm_eps=1e-5,
                         tie_embeddings=tie_embeddings, qkv_bias=attention_bias, out_bias=attention_bias,
                         rope_scaling=rope_scaling)
    torch.manual_seed(seed)
    model = CausalTransformer(cfg)
    with torch.no_grad():  # random biases and norm weights too, so that a dropped one would show
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("norm.weight") else 0.0))
    write_hf(folder, model.state_dict(), cfg, tok.bos_id, tok.eos_id)
    tok.save(folder)
    return folder
