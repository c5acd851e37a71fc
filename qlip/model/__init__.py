"""The QLIP model, its configs and named presets."""
from .config import (DecoderConfig, PreprocessConfig, QLIPConfig, QuantizerConfig, TextConfig,
                     VisionConfig)
from .presets import get_preset, list_presets, preset_hub_id, register_preset
from .qlip import QLIP, ImagePass, QLIPOutput

__all__ = ["QLIP", "ImagePass", "QLIPOutput", "QLIPConfig", "VisionConfig", "DecoderConfig", "TextConfig",
           "QuantizerConfig", "PreprocessConfig", "get_preset", "list_presets", "preset_hub_id",
           "register_preset"]
