"""Reading and writing model checkpoints: our format, the official format, hub ids, presets.

Our format is a folder with ``config.json`` (``{"format": "qlip", "format_version": 1,
"config": {...}}``) and ``model.safetensors``. Nothing is ever unpickled: safetensors, or
``torch.load(weights_only=True)`` for the official ``pytorch_model.bin``.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, Optional, Union

import torch

from ..compat import console_scripts
from ..errors import CheckpointError, ConfigError, QLIPError
from ..model import QLIP, QLIPConfig, get_preset, list_presets, preset_hub_id
from ..model.precision import cast_for_inference
from ..nn.precision import resolve_precision
from . import official
from .atomic import atomic_folder, atomic_write, atomic_write_text

FORMAT_VERSION = 1
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---- weights files -------------------------------------------------------------------------
def read_state_dict(folder: str) -> Dict[str, torch.Tensor]:
    st = os.path.join(folder, "model.safetensors")
    bin_ = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        try:
            return load_file(st)
        except Exception as e:  # safetensors raises its own error types  # noqa: BLE001
            raise CheckpointError(f"{st}: not a readable safetensors file ({e})") from None
    if os.path.isfile(bin_):
        try:
            sd = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors come in many types
            raise CheckpointError(f"{bin_}: cannot be loaded safely with weights_only=True ({e.__class__.__name__})") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{bin_}: expected a state dict, found {type(sd).__name__}")
        return sd
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")


def write_safetensors(sd: Dict[str, torch.Tensor], path: str, metadata=None) -> None:
    from safetensors.torch import save_file
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=metadata or {"format": "pt"}))


def read_json(path: str) -> dict:
    """A JSON file of a checkpoint folder; a missing, unreadable or invalid file is a one-line
    CheckpointError naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.__class__.__name__}: {e})") from None


def load_state_dict_strict(model: QLIP, sd: Dict[str, torch.Tensor], source: str) -> None:
    """Load ``sd`` into ``model``; any missing, unexpected or mis-shaped key is an error naming it."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(sd)) if tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_few(extra)}")
    if shapes:
        problems.append(f"shape mismatch: {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model config; " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)


def _few(items, n=4):
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# ---- our format --------------------------------------------------------------------------
def save_pretrained(model: QLIP, folder: str, safe_serialization: bool = True, state_dict=None) -> None:
    """Write ``config.json`` + ``model.safetensors`` into ``folder``, all files at once: they are
    written into a temporary folder next to it and renamed into place, so an interrupted or failed
    save leaves no partial checkpoint. ``state_dict``: the weights to write instead of
    ``model.state_dict()`` (e.g. gathered from a sharded model)."""
    meta = {"format": "qlip", "format_version": FORMAT_VERSION, "config": model.config.to_dict()}
    src = getattr(model, "_source_folder", None)
    copies = [name for name in TOKENIZER_FILES if src and os.path.isfile(os.path.join(src, name))
              and os.path.abspath(src) != os.path.abspath(folder)]
    with atomic_folder(folder) as tmp:
        write_safetensors(model.state_dict() if state_dict is None else state_dict,
                          os.path.join(tmp, "model.safetensors"))
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(meta, indent=2) + "\n")
        for name in copies:
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))


def export_official(model: QLIP, folder: str) -> None:
    """Write the model in the official NVIDIA format (config.json, model.safetensors,
    preprocessor_config.json), loadable by the official ``QLIPModel.from_pretrained``.

    Everything the format cannot express (e.g. a conv stem) is refused before anything is
    written, and the files appear together (see :func:`save_pretrained`)."""
    config = official.config_to_official(model.config)  # ConfigError for unsupported models
    preprocessor = official.preprocessor_to_official(model.config)
    sd = official.state_dict_to_official(model.state_dict(), model.config)
    with atomic_folder(folder) as tmp:
        write_safetensors(sd, os.path.join(tmp, "model.safetensors"))
        atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2) + "\n")
        atomic_write_text(os.path.join(tmp, "preprocessor_config.json"), json.dumps(preprocessor, indent=2) + "\n")


def load_folder(folder: str) -> QLIP:
    """Load our format or the official format from a local folder."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{folder}: no config.json")
    raw = read_json(cfg_path)
    sd = read_state_dict(folder)
    if raw.get("format") == "qlip":
        if raw.get("format_version", 1) > FORMAT_VERSION:
            raise CheckpointError(f"{folder}: format_version {raw['format_version']} is newer than this qlip")
        try:
            cfg = QLIPConfig.from_dict(raw["config"])
        except (ConfigError, TypeError) as e:
            raise CheckpointError(f"{cfg_path}: config cannot build a model: {e}") from None
    elif official.is_official_config(raw):
        pre_path = os.path.join(folder, "preprocessor_config.json")
        pre = read_json(pre_path) if os.path.isfile(pre_path) else None
        try:
            cfg = official.config_from_official(raw, state_keys=sd.keys(), preprocessor=pre)
        except (ConfigError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_path}: official config cannot build a model: {e}") from None
        sd = official.state_dict_from_official(sd)
    else:
        raise CheckpointError(f"{cfg_path}: neither a qlip nor an official QLIP config")
    model = QLIP(cfg, init=False)
    load_state_dict_strict(model, sd, folder)
    model._source_folder = folder
    if cfg.text is not None and os.path.isfile(os.path.join(folder, "vocab.json")):
        from ..text import Tokenizer
        model.tokenizer = Tokenizer(cfg.text.context_length, folder=folder)
    return model.eval()


# ---- hub -----------------------------------------------------------------------------------
HUB_PATTERNS = ["config.json", "model.safetensors", "preprocessor_config.json", *TOKENIZER_FILES]


def hub_cli() -> str:
    """The download command of the installed huggingface_hub: ``hf`` (>= 0.34) or ``huggingface-cli``."""
    try:
        scripts = {name for name, value in console_scripts().items() if value.startswith("huggingface_hub")}
    except Exception:  # noqa: BLE001 - broken metadata: fall back to the current name
        scripts = set()
    return "huggingface-cli" if scripts and "hf" not in scripts else "hf"


class HubUnavailableError(CheckpointError):
    """A hub id could not be fetched (offline, no network, unknown repo). The message gives the
    exact download command of the installed huggingface_hub and the local-folder alternative;
    ``folder_hint`` says how to pass a folder (``qlip.load(DIR)`` in Python, ``--model DIR`` on
    the command line: see :meth:`with_folder_hint`)."""

    def __init__(self, repo_id: str, cause: str,
                 folder_hint: str = "DIR instead of the hub id (qlip.load(DIR))") -> None:
        self.repo_id, self.cause, self.folder_hint = repo_id, cause, folder_hint
        cli = hub_cli()
        super().__init__(
            f"cannot download {repo_id} ({cause}; offline or no network). On a machine with internet run "
            f"`{cli} download {repo_id} --local-dir DIR`, copy DIR here and pass {folder_hint}; "
            f"or run `{cli} download {repo_id}` on this machine while online, which fills the hub cache "
            f"that offline loading reads")

    def with_folder_hint(self, folder_hint: str) -> "HubUnavailableError":
        return HubUnavailableError(self.repo_id, self.cause, folder_hint)


def download(repo_id: str, revision: Optional[str] = None) -> str:
    """Fetch a hub repo into the local Hugging Face cache and return its folder.

    Offline (``HF_HUB_OFFLINE=1`` or no network) it uses the cache, or raises
    :class:`HubUnavailableError`, whose one line gives the download command."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise QLIPError("loading from the hub needs `pip install huggingface_hub`") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, etag_timeout=10)
    except Exception as e:  # noqa: BLE001 - hub errors: offline mode, HTTP, DNS, ...
        raise HubUnavailableError(repo_id, e.__class__.__name__) from None
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        # older repos ship only pytorch_model.bin
        try:
            folder = snapshot_download(repo_id, revision=revision,
                                       allow_patterns=HUB_PATTERNS + ["pytorch_model.bin"], etag_timeout=10)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot download weights of {repo_id} ({e.__class__.__name__})") from None
    return folder


def load(name_or_path: Union[str, os.PathLike], pretrained: Optional[bool] = None,
         device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None,
         revision: Optional[str] = None, precision: Optional[str] = None, **overrides) -> QLIP:
    """Load a QLIP model from a preset name, a local folder (ours or official) or a hub id.

    ``pretrained``: for a preset name, ``False`` gives random weights and ``True`` downloads the
    released weights (presets without released weights fail); ``None`` (default) loads released
    weights when the preset has them. ``overrides`` (dotted config keys) apply to presets only.

    ``precision``: ``"fp32"``, ``"bf16"`` or ``"auto"`` for inference (see ``qlip.model.precision``):
    bf16 casts the weights to bfloat16 once and keeps the pre-sign projection in float32, so the
    ids stay >= 99% bit-equal to fp32; auto picks bf16 on a CUDA GPU or an AMX CPU, else fp32.
    The choice is kept as ``model.precision_choice``. Not combinable with ``dtype``.
    """
    if precision is not None and dtype is not None:
        raise ConfigError("pass either dtype or precision to load, not both")
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        model = load_folder(name)
    elif name in list_presets():
        hub = preset_hub_id(name)
        if pretrained is True and hub is None:
            raise CheckpointError(f"preset {name!r} has no released weights; use pretrained=False")
        if hub is not None and pretrained is not False:
            if overrides:
                raise ConfigError("config overrides apply to random-init presets only")
            model = load_folder(download(hub, revision))
        else:
            model = QLIP(get_preset(name, **overrides)).eval()
    elif name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/")):
        model = load_folder(download(name, revision))
    else:
        raise CheckpointError(f"{name!r} is not a folder, a hub id or a preset "
                              f"(presets: {', '.join(list_presets())})")
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    if precision is not None:
        choice = resolve_precision(precision, model.device)
        cast_for_inference(model, choice.name)
        model.precision_choice = choice
    return model
