"""Decoder-only (causal) transformer in the Llama layout: the language-model backbone of the
text-to-image (LlamaGen-style), VLM (LLaVA-style) and unified (Llama-3-based UM3) models.

    h = tok_embeddings(tokens)            or   h = embeds (e.g. text embeddings with image features spliced in)
    for each block:  h = h + attn(attn_norm(h), rope, mask, cache)     # RMSNorm, GQA, QK-norm opt.
                     h = h + mlp(mlp_norm(h))                         # SwiGLU
    logits = output(norm(h))

Nothing here is used by the QLIP tokenizer itself; parameter names follow Hugging Face Llama /
Qwen (see :mod:`qlip.nn.hf_llama` for loading their weights).

Positions: by default token ``t`` of the input sits at position ``start + t``; ``positions``
(``(T,)`` or ``(B, T)``) overrides that (e.g. :func:`qlip.nn.masks.padded_positions` for left
padding), and ``rope=(cos, sin)`` overrides the tables themselves (e.g. 2-D RoPE for image tokens,
built with :func:`qlip.nn.rope_1d.rope_table_from_angles`; shape ``(T, D)`` or ``(B, T, D)``).

Masks: ``mask=None`` is causal (also with a KV cache); otherwise a boolean SDPA mask, ``True`` =
attend, that must include causality (:mod:`qlip.nn.masks`).

Initialisation (:meth:`CausalTransformer.init_weights`): every linear and embedding weight
``N(0, init_std)`` (0.02, as Hugging Face Llama's ``initializer_range``), biases 0, norms 1.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import nn

from ..errors import ConfigError, QLIPError
from .causal_attention import CausalSelfAttention
from .feed_forward import SwiGLUFeedForward
from .kv_cache import KVCache
from .rmsnorm import RMSNorm
from .rope_1d import Llama3RopeScaling, RopeTable, rope_1d_table, rope_inv_freq


@dataclass
class CausalLMConfig:
    """Shape and switches of a :class:`CausalTransformer` (Llama naming in comments).

    ``n_kv_heads=None`` means ``n_heads`` (no GQA); ``head_dim=None`` means ``dim // n_heads``.
    ``rope_scaling`` is ``None``, a :class:`Llama3RopeScaling` or a dict for it (Llama 3.1+).
    ``max_seq_len`` is the default KV-cache length; positions beyond it are not refused.
    """

    vocab_size: int = 32000
    dim: int = 768                      # hidden_size
    n_layers: int = 12                  # num_hidden_layers
    n_heads: int = 12                   # num_attention_heads
    n_kv_heads: Optional[int] = None    # num_key_value_heads (grouped-query attention)
    head_dim: Optional[int] = None
    ffn_hidden: int = 2048              # intermediate_size of the SwiGLU
    norm_eps: float = 1e-5              # rms_norm_eps (all norms, QK-norm included)
    rope_theta: float = 10000.0
    rope_scaling: Optional[Union[Llama3RopeScaling, Mapping[str, Any]]] = None
    qk_norm: bool = False               # RMSNorm over each head's q and k before RoPE (Qwen3)
    qkv_bias: bool = False              # biases on q/k/v projections (Qwen2; Llama attention_bias)
    out_bias: bool = False              # bias on the attention output projection (Llama attention_bias)
    mlp_bias: bool = False
    max_seq_len: int = 2048
    tie_embeddings: bool = False        # output head shares the token embedding matrix
    init_std: float = 0.02
    grad_checkpointing: bool = False    # recompute each block in the backward pass

    def __post_init__(self):
        if isinstance(self.rope_scaling, Mapping):
            self.rope_scaling = Llama3RopeScaling.from_dict(self.rope_scaling)
        self.validate()

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads if self.head_dim is None else self.head_dim

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"CausalLMConfig.{name} must be a positive integer, got {value!r}")
        for name in ("n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"CausalLMConfig.{name} must be None or a positive integer, got {value!r}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(f"CausalLMConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.head_dim is None and self.dim % self.n_heads != 0:
            raise ConfigError(f"CausalLMConfig.dim={self.dim} is not divisible by n_heads={self.n_heads} "
                              "(or set head_dim)")
        if self.head_size < 2 or self.head_size % 2 != 0:
            raise ConfigError(f"CausalLMConfig.head_dim must be even for RoPE, got {self.head_size}")
        for name in ("norm_eps", "rope_theta"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"CausalLMConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.init_std < 0:
            raise ConfigError(f"CausalLMConfig.init_std must be >= 0, got {self.init_std}")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, Llama3RopeScaling):
                raise ConfigError("CausalLMConfig.rope_scaling must be None, a dict or Llama3RopeScaling, "
                                  f"got {type(self.rope_scaling).__name__}")
            self.rope_scaling.validate("CausalLMConfig.rope_scaling")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CausalLMConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"CausalLMConfig: unknown fields {unknown}")
        return cls(**d)


class DecoderBlock(nn.Module):
    """Pre-norm block: ``h + attn(attn_norm(h))``, then ``h + mlp(mlp_norm(h))``."""

    def __init__(self, cfg: CausalLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size, qk_norm=cfg.qk_norm,
                                        qkv_bias=cfg.qkv_bias, out_bias=cfg.out_bias, norm_eps=cfg.norm_eps)
        self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLUFeedForward(cfg.dim, cfg.ffn_hidden, bias=cfg.mlp_bias)

    def forward(self, h: torch.Tensor, rope: Optional[RopeTable] = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, start: int = 0) -> torch.Tensor:
        h = h + self.attn(self.attn_norm(h), rope=rope, mask=mask, cache=cache, start=start)
        return h + self.mlp(self.mlp_norm(h))


class CausalTransformer(nn.Module):
    """Token embedding, :class:`DecoderBlock` stack, final RMSNorm and output head."""

    def __init__(self, cfg: CausalLMConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([DecoderBlock(cfg) for _ in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # float32 always: a plain attribute, not a buffer, so model.to(bfloat16) cannot round it
        self._inv_freq = rope_inv_freq(cfg.head_size, cfg.rope_theta, cfg.rope_scaling)
        self.grad_checkpointing = cfg.grad_checkpointing
        self.init_weights()

    # ---- parameters ----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Linear/embedding weights ``N(0, init_std)``, biases 0, RMSNorm weights 1."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                m.reset_parameters()

    def fsdp_units(self) -> List[Tuple[str, nn.Module]]:
        """The modules to wrap one by one with FSDP (``fully_shard``), by state-dict prefix, in
        order: the decoder blocks (the counterpart of lingua's ``build_fsdp_grouping_plan``). As in
        ``qlip.train.distributed.shard_units``, embedding, final norm and head stay with the root."""
        return [(f"layers.{i}", layer) for i, layer in enumerate(self.layers)]

    # ---- rotary tables and cache -----------------------------------------------------------------
    def rope_tables(self, positions: torch.Tensor) -> RopeTable:
        """Float32 ``(cos, sin)`` of this model's 1-D RoPE for ``positions`` ``(T,)`` or ``(B, T)``."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        return rope_1d_table(positions, self._inv_freq)

    def make_cache(self, batch: int, max_len: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> List[KVCache]:
        """One :class:`KVCache` per block (default length ``cfg.max_seq_len``, the parameters' dtype
        and device)."""
        p = self.output.weight
        return [KVCache(batch, self.cfg.kv_heads, max_len or self.cfg.max_seq_len, self.cfg.head_size,
                        dtype=dtype or p.dtype, device=device or p.device) for _ in self.layers]

    # ---- forward ---------------------------------------------------------------------------------
    def forward_hidden(self, tokens: Optional[torch.Tensor] = None, *, embeds: Optional[torch.Tensor] = None,
                       positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                       cache: Optional[List[KVCache]] = None, start: Optional[int] = None,
                       rope: Optional[RopeTable] = None) -> torch.Tensor:
        """The final hidden states ``(B, T, dim)`` after the last norm (the input of the head).

        ``tokens`` ``(B, T)`` ids or ``embeds`` ``(B, T, dim)`` (exactly one). ``start`` is the
        cache slot of the first input token (default: ``cache[0].length`` with a cache, else 0).
        ``positions`` (RoPE positions, ``(T,)`` or ``(B, T)``) default to ``start + arange(T)``;
        they may differ from the slots, e.g. with left padding. ``rope`` overrides the tables.
        ``mask``: ``None`` for causal, else a boolean mask over keys ``[0, start + T)``.
        """
        if (tokens is None) == (embeds is None):
            raise QLIPError("CausalTransformer: pass exactly one of tokens or embeds")
        h = self.tok_embeddings(tokens) if embeds is None else embeds
        if h.dim() != 3 or h.shape[-1] != self.cfg.dim:
            raise QLIPError(f"CausalTransformer: expected (batch, seq, {self.cfg.dim}) embeddings, "
                            f"got {tuple(h.shape)}")
        T = h.shape[1]
        if cache is not None and len(cache) != len(self.layers):
            raise QLIPError(f"CausalTransformer: {len(cache)} caches for {len(self.layers)} layers")
        if start is None:
            start = cache[0].length if cache is not None else 0
        if rope is None:
            if positions is None:
                positions = torch.arange(start, start + T, device=h.device)
            rope = self.rope_tables(positions)
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache is not None else None
            if checkpointing:
                h = torch.utils.checkpoint.checkpoint(layer, h, rope, mask, None, start, use_reentrant=False)
            else:
                h = layer(h, rope=rope, mask=mask, cache=layer_cache, start=start)
        return self.norm(h)

    def forward(self, tokens: Optional[torch.Tensor] = None, *, embeds: Optional[torch.Tensor] = None,
                positions: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                cache: Optional[List[KVCache]] = None, start: Optional[int] = None,
                rope: Optional[RopeTable] = None,
                return_hidden: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Logits ``(B, T, vocab_size)``, or ``(logits, hidden)`` with ``return_hidden``; the
        arguments are those of :meth:`forward_hidden`. To score only some positions, call
        :meth:`forward_hidden` and ``self.output`` on the slice you need."""
        hidden = self.forward_hidden(tokens, embeds=embeds, positions=positions, mask=mask, cache=cache,
                                     start=start, rope=rope)
        logits = self.output(hidden)
        return (logits, hidden) if return_hidden else logits
