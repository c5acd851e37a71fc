"""qlip: QLIP, the text-aligned visual tokenizer (arXiv 2502.05178), in PyTorch.

    import qlip
    model = qlip.load("nvidia/QLIP-B-16-256")
    ids = model.tokenize(model.preprocess(images))
"""
from .errors import CheckpointError, ConfigError, DataError, QLIPError
from .io import export_official, load, save_pretrained
from .model import QLIP, QLIPConfig, get_preset, list_presets, register_preset
from .quant import BinarySphericalQuantizer

__version__ = "0.1.0"

__all__ = ["load", "save_pretrained", "export_official", "QLIP", "QLIPConfig", "get_preset", "list_presets",
           "register_preset", "BinarySphericalQuantizer", "QLIPError", "CheckpointError", "ConfigError",
           "DataError", "__version__"]
