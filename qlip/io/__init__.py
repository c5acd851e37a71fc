"""Checkpoints: our format, the official NVIDIA format (in and out), open_clip / EVA-CLIP
initialisation, hub ids, atomic writes."""
from ..model.qlip import register_checkpoint_writer
from .atomic import atomic_path, atomic_write, atomic_write_text
from .checkpoint import (download, export_official, load, load_folder, load_state_dict_strict,
                         read_json, read_state_dict, save_pretrained, write_safetensors)
from .init_weights import init_text_from_open_clip, init_visual_from_eva_clip

register_checkpoint_writer(save_pretrained)  # QLIP.save_pretrained writes our format (model sits below io)

__all__ = ["atomic_path", "atomic_write", "atomic_write_text", "download", "export_official", "load",
           "load_folder", "load_state_dict_strict", "read_json", "read_state_dict", "save_pretrained", "write_safetensors",
           "init_text_from_open_clip", "init_visual_from_eva_clip"]
