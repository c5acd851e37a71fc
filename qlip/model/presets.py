"""Named model configurations (timm-style registry).

The three released models (``qlip-b-16-256``, ``qlip-b-8-256``, ``qlip-l-14-392``) follow the
shapes in the paper (Table 14) and the published config of B-16 (see docs/official-format.md);
their checkpoints live on the Hugging Face hub under ``hub_id``. Fields that only the real
``config.json`` knows (e.g. the BSQ group size of B-8/L-14) are read from it when a checkpoint is
loaded: a preset's values only matter for random initialisation.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

from ..errors import ConfigError
from .config import QLIPConfig

_PRESETS: Dict[str, Dict[str, Any]] = {}
_HUB_IDS: Dict[str, str] = {}


def register_preset(name: str, config: Dict[str, Any], hub_id: Optional[str] = None) -> None:
    QLIPConfig.from_dict(copy.deepcopy(config))  # validate now, fail at registration
    _PRESETS[name] = copy.deepcopy(config)
    if hub_id:
        _HUB_IDS[name] = hub_id


def list_presets() -> List[str]:
    return sorted(_PRESETS)


def preset_hub_id(name: str) -> Optional[str]:
    return _HUB_IDS.get(name)


def get_preset(name: str, **overrides) -> QLIPConfig:
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    cfg = QLIPConfig.from_dict(copy.deepcopy(_PRESETS[name]))
    return cfg.replace(**overrides) if overrides else cfg


def _eva(width, depth, heads, mlp_dim, **kw):
    """An EVA-02 tower: SwiGLU + sub-LN + 2D RoPE, no key bias, LN eps 1e-6."""
    return dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, q_bias=True, k_bias=False,
                v_bias=True, swiglu=True, subln=True, rope=True, ln_eps=1e-6, **kw)


def _clip_text(width, depth, heads, mlp_dim, **kw):
    return dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, ln_eps=1e-5, **kw)


def _released(image, patch, vision, decoder, text, embed_dim, resize=None, group_size=1):
    return dict(
        vision=dict(image_size=image, patch_size=patch, projection_bias=True, **vision),
        decoder=decoder,
        quantizer=dict(bits=28, group_size=group_size, inv_temperature=1.0),
        text=dict(legacy_pooling=True, eos_token_id=2, **text),  # published eos id 2: argmax pooling
        embed_dim=embed_dim,
        preprocess=dict(resize=resize or image, crop=image),
    )


register_preset("qlip-b-16-256", _released(
    256, 16, _eva(768, 12, 12, 2048), _eva(768, 12, 12, 2048), _clip_text(512, 12, 8, 2048), 512),
    hub_id="nvidia/QLIP-B-16-256")
register_preset("qlip-b-8-256", _released(
    256, 8, _eva(768, 12, 12, 2048), _eva(768, 12, 12, 2048), _clip_text(512, 12, 8, 2048), 512,
    resize=392), hub_id="nvidia/QLIP-B-8-256")
register_preset("qlip-l-14-392", _released(
    392, 14, _eva(1024, 24, 16, 2730), _eva(1024, 24, 16, 2730), _clip_text(768, 12, 12, 3072), 768),
    hub_id="nvidia/QLIP-L-14-392")

# tiny model for tests: same layout as the official-tiny fixtures (eva variant)
register_preset("qlip-tiny", dict(
    vision=dict(image_size=32, patch_size=8, projection_bias=True, **_eva(64, 2, 4, 160)),
    decoder=_eva(48, 2, 4, 96),
    quantizer=dict(bits=28, group_size=7, inv_temperature=100.0),
    text=_clip_text(48, 2, 4, 96),
    embed_dim=32,
    preprocess=dict(resize=32, crop=32),
))

# the demo model (README main job): 64x64 images, patch 8 -> 8x8 = 64 tokens of 28 bits
register_preset("qlip-demo", dict(
    vision=dict(image_size=64, patch_size=8, projection_bias=True, **_eva(128, 4, 4, 344)),
    decoder=_eva(128, 3, 4, 344),
    quantizer=dict(bits=28, group_size=7, inv_temperature=1.0),
    text=_clip_text(128, 2, 4, 512, context_length=32),  # shapes captions fit in 32 BPE tokens
    embed_dim=128,
    preprocess=dict(resize=64, crop=64),
))
