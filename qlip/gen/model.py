"""The text-to-image generator: a LlamaGen-style decoder-only transformer over QLIP token ids.

    sequence   = [ caption prefix (text_len) | image tokens 0 .. N-2 ]         (N = grid_h * grid_w)
    prefix     = MLP(frozen text encoder's token features)    (or the learned null condition;
                 text_vocab > 0: learned Embedding(caption id) + learned position)
    image in   = head.embed(id)   (sum of sub-token embeddings, or Linear on the bits)
    hidden     = CausalTransformer.forward_hidden(embeds=sequence, rope=our tables)
    predictions: hidden[text_len - 1 + t] -> id of image token t  (through the visual head)

Backbone: :class:`qlip.nn.CausalTransformer` (RMSNorm pre-norm, SwiGLU, GQA, optional QK-norm,
KV cache), driven with ``embeds=`` and external rotary tables; its token embedding and output
layer are unused (vocabulary 1, frozen): the visual head owns both ends (:mod:`qlip.gen.heads`).

**Rotary positions.** Image token ``t`` at grid cell ``(r, c) = divmod(t, grid_w)`` gets 2-D RoPE
as LlamaGen: the head dimension is split in halves, the first rotating with the row, the second
with the column (each half a 1-D RoPE of size ``head_dim / 2``). The caption prefix gets the
identity rotation (``prefix_rope="none"``, the default): its queries and keys keep their content,
and the order of the caption's words is already in the frozen text encoder's features (it has its
own position embeddings) and in the causal mask. LlamaGen instead writes zero rows
(``cos = sin = 0``) for its prefix (its issue #54): that zeroes every prefix query and key, so all
attention logits to the caption are 0 and an image token averages the caption's values uniformly,
unable to look up a word. ``prefix_rope="zero"`` reproduces it for comparison.

Presets (:data:`PRESETS`): LlamaGen's sizes ``gpt-b`` (12 layers, 768, 12 heads), ``gpt-l`` (24,
1024, 16), ``gpt-xl`` (36, 1280, 20; the paper's LlamaGen-XL), SwiGLU hidden ``2/3 * 4 * dim``
rounded up to 256 (LlamaGen's rule), plus ``gpt-demo`` (4 layers, 256) and ``gpt-tiny`` (tests).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError
from ..nn import CausalLMConfig, CausalTransformer, RMSNorm, rope_inv_freq, rope_table_from_angles
from .heads import HEAD_KINDS, make_head
from .text import TextCondition

PREFIX_ROPE = ("none", "zero")


def _llamagen_ffn(dim: int, multiple_of: int = 256) -> int:
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


PRESETS: Dict[str, Dict[str, int]] = {
    "gpt-b": dict(dim=768, n_layers=12, n_heads=12, ffn_hidden=_llamagen_ffn(768)),
    "gpt-l": dict(dim=1024, n_layers=24, n_heads=16, ffn_hidden=_llamagen_ffn(1024)),
    "gpt-xl": dict(dim=1280, n_layers=36, n_heads=20, ffn_hidden=_llamagen_ffn(1280)),
    "gpt-demo": dict(dim=256, n_layers=4, n_heads=4, ffn_hidden=688),
    "gpt-tiny": dict(dim=32, n_layers=2, n_heads=4, ffn_hidden=64),
}


@dataclass
class GenConfig:
    """Everything that fixes the generator's shape (saved in ``config.json``)."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    ffn_hidden: int = 688
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    qk_norm: bool = False
    init_std: float = 0.02
    bits: int = 28                       # bits of a token id
    grid_h: int = 16                     # image token grid
    grid_w: int = 16
    head: str = "split"                  # split | bitwise | intra (qlip.gen.heads)
    groups: int = 2                      # sub-tokens per id (split head)
    text_dim: int = 512                  # width of the text encoder's features (0 with text_vocab)
    text_vocab: int = 0                  # > 0: the prefix is a learned embedding of caption token ids
    text_len: int = 16                   # caption prefix length (features padded / truncated to it)
    prefix_rope: str = "none"            # none (identity rotation) | zero (LlamaGen's zero rows)

    def __post_init__(self):
        self.validate()

    @property
    def num_image_tokens(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def seq_len(self) -> int:
        """Longest sequence the model runs: prefix + all image tokens (the last only as output)."""
        return self.text_len + self.num_image_tokens

    def backbone_config(self) -> CausalLMConfig:
        return CausalLMConfig(vocab_size=1, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                              n_kv_heads=self.n_kv_heads, ffn_hidden=self.ffn_hidden, norm_eps=self.norm_eps,
                              rope_theta=self.rope_theta, qk_norm=self.qk_norm, max_seq_len=self.seq_len,
                              init_std=self.init_std)

    def validate(self) -> None:
        for name in ("bits", "grid_h", "grid_w", "groups", "text_dim", "text_len", "text_vocab"):
            v = getattr(self, name)
            lo = 0 if name == "text_vocab" or (name == "text_dim" and self.text_vocab) else 1
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"GenConfig.{name} must be an integer >= {lo}, got {v!r}")
        if self.head not in HEAD_KINDS:
            raise ConfigError(f"GenConfig.head must be one of {', '.join(HEAD_KINDS)}, got {self.head!r}")
        if self.prefix_rope not in PREFIX_ROPE:
            raise ConfigError(f"GenConfig.prefix_rope must be one of {', '.join(PREFIX_ROPE)}, got {self.prefix_rope!r}")
        cfg = self.backbone_config()  # checks the transformer fields
        if cfg.head_size % 4:
            raise ConfigError(f"2-D RoPE needs a head dimension divisible by 4, got {cfg.head_size}")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "GenConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown generator preset {name!r} (known: {', '.join(PRESETS)})")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GenConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"GenConfig: unknown fields {unknown}")
        return cls(**d)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


def rope_tables(cfg: GenConfig) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float32 ``(cos, sin)`` ``(seq_len, head_dim)`` for every sequence slot: the prefix rows
    (identity or zero, ``cfg.prefix_rope``), then image token ``t`` at its grid cell."""
    D = cfg.backbone_config().head_size
    inv = rope_inv_freq(D // 2, cfg.rope_theta)                          # (D/4,) per axis
    t = torch.arange(cfg.num_image_tokens)
    r, c = t // cfg.grid_w, t % cfg.grid_w
    angles = torch.cat([r[:, None].float() * inv, c[:, None].float() * inv], dim=-1)   # (N, D/2)
    img_cos, img_sin = rope_table_from_angles(angles)
    if cfg.prefix_rope == "zero":
        pre_cos = torch.zeros(cfg.text_len, D)
    else:
        pre_cos = torch.ones(cfg.text_len, D)
    pre_sin = torch.zeros(cfg.text_len, D)
    return torch.cat([pre_cos, img_cos]), torch.cat([pre_sin, img_sin])


class T2IModel(nn.Module):
    """Text condition MLP + causal backbone + visual head (see the module docstring)."""

    def __init__(self, cfg: GenConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.cond = TextCondition(cfg.text_dim, cfg.dim, cfg.text_len, cfg.text_vocab)
        self.backbone = CausalTransformer(cfg.backbone_config())
        for p in (self.backbone.tok_embeddings.weight, self.backbone.output.weight):
            p.requires_grad_(False)  # unused: the visual head embeds and predicts ids
        self.head = make_head(cfg.head, cfg.dim, cfg.bits, cfg.groups)
        self._rope = rope_tables(cfg)  # plain float32 attributes: model.to(bf16) must not round them
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Backbone as :meth:`CausalTransformer.init_weights`; condition and head linear /
        embedding weights ``N(0, init_std)``, biases 0, norms 1, null condition ``N(0, init_std)``."""
        self.backbone.init_weights()
        for mod in (self.cond, self.head):
            for m in mod.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=self.cfg.init_std)
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, RMSNorm):
                    m.reset_parameters()
        nn.init.normal_(self.cond.null, std=self.cfg.init_std)
        if self.cond.pos is not None:
            nn.init.normal_(self.cond.pos, std=self.cfg.init_std)

    def fsdp_units(self) -> List[nn.Module]:
        return [m for _, m in self.backbone.fsdp_units()]

    def rope(self, start: int, length: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables of sequence slots ``[start, start + length)``."""
        cos, sin = self._rope
        if cos.device != device:
            self._rope = cos, sin = cos.to(device), sin.to(device)
        return cos[start:start + length], sin[start:start + length]

    # ---- training ---------------------------------------------------------------------------
    def hidden(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``prefix`` ``(B, text_len, dim)``, ``ids`` ``(B, N)`` -> the hidden states ``(B, N, dim)``
        that predict ids ``0 .. N-1`` (teacher forcing)."""
        L, N = self.cfg.text_len, self.cfg.num_image_tokens
        if prefix.shape[1] != L or ids.shape[1] != N:
            raise ConfigError(f"T2IModel: expected a {L}-token prefix and {N} image tokens, got "
                              f"{prefix.shape[1]} and {ids.shape[1]}")
        x = torch.cat([prefix, self.head.embed(ids[:, :-1]).to(prefix.dtype)], dim=1)
        h = self.backbone.forward_hidden(embeds=x, rope=self.rope(0, x.shape[1], x.device))
        return h[:, L - 1:]

    def forward(self, feats: torch.Tensor, ids: torch.Tensor, drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean NLL per image token (nats) of ``ids`` ``(B, N)`` given text features ``(B, L, text_dim)``;
        ``drop`` ``(B,)`` bool replaces those captions by the null condition."""
        h = self.hidden(self.cond(feats, drop), ids.flatten(1))
        return self.head.loss(h, ids.flatten(1))

    # ---- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, feats: torch.Tensor, cfg: float = 1.0, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, generator: Optional[torch.Generator] = None, cfg_interval: int = -1,
                 use_cache: bool = True) -> torch.Tensor:
        """Ids ``(B, grid_h, grid_w)`` for text features ``(B, L, text_dim)``, raster order.

        ``cfg != 1``: the batch is doubled with the null condition and each head factor is guided
        (``qlip.gen.heads``); ``cfg == 1`` runs the conditional model alone. ``cfg_interval`` ``k
        >= 0`` guides only the first ``k`` image tokens (LlamaGen's), ``-1`` all of them; after the
        ``k``-th token the null rows leave the batch (the KV cache's first ``B`` rows are the
        conditional ones), so the rest costs what unguided sampling costs.
        ``use_cache=False`` recomputes the whole sequence at every step (the reference the KV cache
        is tested against). ``generator`` makes sampling reproducible."""
        B, L, N = feats.shape[0], self.cfg.text_len, self.cfg.num_image_tokens
        guided = cfg != 1.0 and cfg_interval != 0
        prefix = self.cond(feats)
        if guided:
            prefix = torch.cat([prefix, self.cond.null[None].to(prefix.dtype).expand(B, -1, -1)])
        cache = self.backbone.make_cache(prefix.shape[0], L + N - 1) if use_cache else None
        seq, x, start, out = prefix, prefix, 0, []
        for t in range(N):
            if cache is not None:
                h = self.backbone.forward_hidden(embeds=x, rope=self.rope(start, x.shape[1], x.device), cache=cache)
                start += x.shape[1]
            else:
                h = self.backbone.forward_hidden(embeds=seq, rope=self.rope(0, seq.shape[1], seq.device))
            h = h[:, -1]
            nxt = self.head.sample(h[:B], h[B:] if guided else None, cfg, temperature, top_k, top_p, generator)
            out.append(nxt)
            if t == N - 1:
                break
            if guided and 0 <= cfg_interval <= t + 1:
                # guidance is over: drop the null rows (the cache's first B rows are the conditional ones)
                guided, seq = False, seq[:B]
            x = self.head.embed(nxt[:, None], check=False).to(prefix.dtype)
            if guided:
                x = torch.cat([x, x])
            if cache is None:
                seq = torch.cat([seq, x], dim=1)
        return torch.stack(out, 1).view(B, self.cfg.grid_h, self.cfg.grid_w)
