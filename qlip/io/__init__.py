"""Checkpoints: our format, the official NVIDIA format (in and out), hub ids, atomic writes."""
from .atomic import atomic_path, atomic_write, atomic_write_text
from .checkpoint import (download, export_official, load, load_folder, load_state_dict_strict,
                         read_state_dict, save_pretrained, write_safetensors)

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "download", "export_official", "load",
           "load_folder", "load_state_dict_strict", "read_state_dict", "save_pretrained", "write_safetensors"]
