"""Dataclass configs of a QLIP model. ``QLIPConfig.from_dict`` validates every key."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError
from ..nn import BlockConfig

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig(BlockConfig):
    """ViT encoder: patchify stem, cls token, learned position embedding (+ optional 2D RoPE).

    ``stem``: ``"patch"`` (the paper's and the official models': one ``patch x patch`` stride-``patch``
    convolution) or ``"conv"`` (early convolutions, Xiao et al. 2021: log2(patch) 3x3 stride-2
    convolutions with GELU, then a 1x1 projection; patch must be a power of two). ``"conv"`` trains
    shape features much faster from scratch (docs/demo.md) but has no official-format equivalent.
    """

    image_size: int = 256
    patch_size: int = 16
    projection_bias: bool = True   # bias of the visual projection head
    stem: str = "patch"
    stem_channels: int = 32        # "conv" stem: channels of the first convolution (doubling after)


@dataclass
class DecoderConfig(BlockConfig):
    """ViT pixel decoder; ``width`` is the post-quantisation width ``Dq``.

    ``head``: how the last hidden state becomes pixels. ``"linear"`` (the paper's and the official
    models'): LayerNorm -> Linear+Tanh (hidden ``head_dim``, 0: ``mlp_dim``) -> Linear(3 p^2) per
    token -> unpatchify. ``"conv"`` (ours): LayerNorm -> a 1x1 convolution on the token grid, then
    log2(patch) x (nearest 2x upsampling, 3x3 convolution, GELU) with channels halving down to
    ``head_channels``, then a 3x3 convolution to RGB: pixels near a patch border see the next
    patch, so edges are continuous across the patch grid (docs/demo.md measured what it changes).
    No official-format equivalent.
    """

    head_dim: int = 0
    head: str = "linear"
    head_channels: int = 16


@dataclass
class TextConfig(BlockConfig):
    """CLIP text transformer (causal, no RoPE)."""

    vocab_size: int = 49408
    context_length: int = 77
    eos_token_id: int = 49407
    legacy_pooling: bool = False   # pool at argmax(token id) instead of the first eos
    projection_bias: bool = False


@dataclass
class QuantizerConfig:
    """Bottleneck: MLP down to ``bits`` channels, optional L2 norm, BSQ, MLP back up."""

    bits: int = 28
    group_size: int = 7
    inv_temperature: float = 1.0
    l2_norm: bool = True            # BSQ output scale 1/sqrt(L)
    input_l2_norm: bool = True      # L2-normalise the MLP output before BSQ
    beta: float = 0.0
    gamma_0: float = 1.0
    gamma_1: float = 1.0
    persample_entropy: str = "group"
    embed_type: str = "mlp"         # "mlp" (paper eq. 5) or "identity" (bits == vision width)


@dataclass
class PreprocessConfig:
    """Image preprocessing: bicubic resize of the shorter side, centre crop, normalise."""

    resize: int = 256
    crop: int = 256
    mean: Tuple[float, float, float] = OPENAI_MEAN
    std: Tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"


@dataclass
class QLIPConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    text: Optional[TextConfig] = field(default_factory=TextConfig)
    embed_dim: int = 512                # joint image-text embedding size (projection_dim)
    logit_scale_init: float = 2.6592    # ln(1 / 0.07)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    # ---- derived ------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        return self.vision.image_size // self.vision.patch_size

    def validate(self) -> "QLIPConfig":
        v, d, q = self.vision, self.decoder, self.quantizer
        try:
            v.validate("vision")
            d.validate("decoder")
            if self.text is not None:
                self.text.validate("text")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if v.image_size % v.patch_size:
            raise ConfigError(f"vision image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.stem not in ("patch", "conv"):
            raise ConfigError(f"vision stem must be 'patch' or 'conv', got {v.stem!r}")
        if v.stem == "conv" and (v.patch_size < 2 or v.patch_size & (v.patch_size - 1) or v.stem_channels < 1):
            raise ConfigError(f"vision stem 'conv' needs a power-of-two patch_size >= 2 and stem_channels >= 1 "
                              f"(got patch_size {v.patch_size}, stem_channels {v.stem_channels})")
        if d.head not in ("linear", "conv"):
            raise ConfigError(f"decoder head must be 'linear' or 'conv', got {d.head!r}")
        if d.head == "conv" and (v.patch_size < 2 or v.patch_size & (v.patch_size - 1) or d.head_channels < 1):
            raise ConfigError(f"decoder head 'conv' needs a power-of-two patch_size >= 2 and head_channels >= 1 "
                              f"(got patch_size {v.patch_size}, head_channels {d.head_channels})")
        if q.bits % q.group_size:
            raise ConfigError(f"quantizer group_size {q.group_size} does not divide bits {q.bits}")
        if q.embed_type not in ("mlp", "identity"):
            raise ConfigError(f"quantizer embed_type must be 'mlp' or 'identity', got {q.embed_type!r}")
        if q.embed_type == "identity" and not (q.bits == v.width == d.width):
            raise ConfigError("quantizer embed_type 'identity' needs bits == vision width == decoder width "
                              f"(got {q.bits}, {v.width}, {d.width})")
        if self.text is not None and self.text.rope:
            raise ConfigError("the text tower has no 2D RoPE; set text.rope false")
        return self

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "QLIPConfig":
        d = dict(d)
        subs = {"vision": VisionConfig, "decoder": DecoderConfig, "quantizer": QuantizerConfig,
                "text": TextConfig, "preprocess": PreprocessConfig}
        kwargs = {}
        for name, sub in subs.items():
            if name in d:
                val = d.pop(name)
                kwargs[name] = None if (val is None and name == "text") else _build(sub, val, name)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        kwargs.update(d)
        return cls(**kwargs).validate()

    def replace(self, **overrides) -> "QLIPConfig":
        """Copy with dotted overrides, e.g. ``cfg.replace(**{"vision.depth": 4})``."""
        d = self.to_dict()
        for key, val in overrides.items():
            *path, last = key.split(".")
            node = d
            for p in path:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"cannot override {key!r}: {p!r} is not a config section")
                node = node[p]
            if last not in node:
                raise ConfigError(f"cannot override {key!r}: no such config key")
            node[last] = val
        return QLIPConfig.from_dict(d)


def _build(sub, val, name):
    if isinstance(val, sub):
        return val
    if not isinstance(val, dict):
        raise ConfigError(f"config section {name!r} must be a mapping, got {type(val).__name__}")
    fields = {f.name: f for f in dataclasses.fields(sub)}
    unknown = sorted(set(val) - set(fields))
    if unknown:
        raise ConfigError(f"unknown keys in config section {name!r}: {', '.join(unknown)}")
    out = {}
    for k, x in val.items():
        if isinstance(x, list):
            x = tuple(x)
        out[k] = x
    return sub(**out)
