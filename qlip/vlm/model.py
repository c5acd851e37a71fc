"""The VLM: a frozen QLIP vision tower, a projector and a Hugging Face causal language model.

``forward(input_ids, attention_mask, pixel_values)`` embeds the text with the LLM's own input
embeddings, overwrites the image positions (the expanded ``<image>`` tokens, see
:mod:`qlip.vlm.conversation`) with the projected vision features (:func:`splice`), and runs the
LLM on ``inputs_embeds``. The loss (:func:`answer_loss`) is next-token cross-entropy on the
labelled (assistant) positions.

Saved format (one folder; ``qlip.vlm.load(folder)`` rebuilds the model in one call). Every
tensor is stored once::

    config.json          {"format": "qlip-vlm", "format_version": 3, "config": VLMConfig fields,
                          "image_token_id", "num_image_tokens", "vision_width", "llm_width"}
    model.safetensors    the VLM's own trainable weights (``projector.*``) and the fixed feature
                         statistics (``feature_norm.*``, with ``feature_norm: standardize``)
    llm/                 the language model as a plain Hugging Face folder: config, generation
                         config, tokenizer and ``model.safetensors`` (its weights under their own
                         names, ``model.*``, ``lm_head.*``): AutoModelForCausalLM.from_pretrained
                         loads it as it is, in any transformers version
    vision/              the frozen QLIP encoder in qlip's format (qlip.load); not in
                         model.safetensors (:mod:`qlip.vlm.vision`)

The VLM registers the LLM's children (``model``, ``lm_head``, ...) as its own, so its parameter
names for the LLM are exactly the LLM's Hugging Face names: :func:`read_weights` joins the two
files into the VLM's state dict (the training engine resumes from it through the task's
``read_model_state``). Older folders still load: format_version 2 (everything in the top
``model.safetensors`` and ``llm/model.safetensors.index.json`` pointing to ``../model.safetensors``,
a shard path that transformers >= 5.2x refuses, hence format 3) and format_version 1 (the LLM
under ``llm.*`` in model.safetensors and again in ``llm/model.safetensors``, the QLIP model under
``vision.qlip.*``).

Not transformers' ``LlavaForConditionalGeneration``: its vision tower must be a registered
``transformers`` model returning ``hidden_states`` (QLIP is not one), its projector is always
the two-layer MLP (no ``linear``, no code features), and its API moved between transformers 4.45
and 5.x; the LLM folder here loads in any version, with any causal LM.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import require_transformers_models
from ..errors import CheckpointError, ConfigError, DataError
from ..io import read_json
from .conversation import IGNORE_INDEX, IMAGE_TOKEN, TEMPLATES
from .feature_norm import FEATURE_NORMS, FeatureNorm
from .projector import PROJECTORS, build_projector, merge_tokens
from .vision import FEATURES, VisionTower

FORMAT = "qlip-vlm"
FORMAT_VERSION = 3


@dataclass
class VLMConfig:
    layer: int = -2                 # encoder block read by the vision tower (python indexing)
    features: str = "hidden"        # hidden (block `layer`'s patch tokens) | codes (after the quantizer)
    projector: str = "mlp2x_gelu"   # mlp2x_gelu (LLaVA-1.5) | linear
    image_token: str = IMAGE_TOKEN  # the placeholder in the text (added to the tokenizer if missing)
    max_length: int = 512           # tokens per sample, image positions included
    template: str = "auto"          # auto (the tokenizer's chat template if any, else plain) | plain
    feature_norm: str = "none"      # none | layernorm | standardize (qlip.vlm.feature_norm)
    token_merge: int = 1            # k: each k x k block of patch tokens -> one LLM position (qlip.vlm.projector)

    def validate(self) -> "VLMConfig":
        if self.features not in FEATURES:
            raise ConfigError(f"model.features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if self.projector not in PROJECTORS:
            raise ConfigError(f"model.projector must be one of {', '.join(PROJECTORS)}, got {self.projector!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ConfigError(f"model.feature_norm must be one of {', '.join(FEATURE_NORMS)}, "
                              f"got {self.feature_norm!r}")
        if self.template not in TEMPLATES:
            raise ConfigError(f"model.template must be one of {', '.join(TEMPLATES)}, got {self.template!r}")
        if self.max_length < 1:
            raise ConfigError(f"model.max_length must be >= 1, got {self.max_length}")
        if self.token_merge < 1:
            raise ConfigError(f"model.token_merge must be >= 1, got {self.token_merge}")
        if not self.image_token:
            raise ConfigError("model.image_token must not be empty")
        return self


def splice(embed_tokens: nn.Module, input_ids: torch.Tensor, image_features: Optional[torch.Tensor],
           image_token_id: int) -> torch.Tensor:
    """``inputs_embeds`` (B, T, D): the token embeddings with the image positions
    (``input_ids == image_token_id``, row-major) replaced by ``image_features`` (n_images, N, D)
    in order: image ``k`` fills the ``k``-th run of ``N`` image positions."""
    mask = input_ids == image_token_id
    emb = embed_tokens(input_ids.masked_fill(mask, 0))
    n = int(mask.sum())
    if image_features is None or image_features.numel() == 0:
        if n:
            raise DataError(f"{n} image positions in the text but no image features")
        return emb
    feats = image_features.reshape(-1, image_features.shape[-1]).to(emb.dtype)
    if feats.shape[0] != n:
        raise DataError(f"{n} image positions in the text but {feats.shape[0]} image features "
                        f"({image_features.shape[0]} image(s) x {image_features.shape[1]} tokens)")
    return emb.masked_scatter(mask.unsqueeze(-1), feats)


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: mean over each sample's labelled tokens, then over the samples
    that have any. A per-sample mean makes the loss of N ranks x b samples the mean of their
    losses, so N ranks train exactly like one process of N*b (and every answer counts equally
    whatever its length). Computed in float32."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    ce = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (target != IGNORE_INDEX).float()
    count = valid.sum(1)
    per_sample = (ce * valid).sum(1) / count.clamp(min=1)
    has = (count > 0).float()
    return (per_sample * has).sum() / has.sum().clamp(min=1)


class VLM(nn.Module):
    """Vision tower + projector + causal LM (module docstring)."""

    def __init__(self, vision: VisionTower, llm: nn.Module, tokenizer, config: VLMConfig):
        super().__init__()
        self.config = config.validate()
        self.vision = vision
        self.tokenizer = tokenizer
        if config.image_token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [config.image_token]})
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(config.image_token))
        if self.image_token_id >= llm.get_input_embeddings().weight.shape[0]:
            llm.resize_token_embeddings(len(tokenizer))
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else config.image_token
        # The LLM itself is not a submodule; its children are, under their own names (module docstring).
        self.__dict__["llm"] = llm
        if any(True for _ in llm.named_parameters(recurse=False)) or any(True for _ in llm.named_buffers(recurse=False)):
            raise ConfigError(f"{type(llm).__name__} holds tensors outside its submodules: not supported as a VLM's LLM")
        for name, child in llm.named_children():
            if name in ("vision", "projector", "feature_norm") or hasattr(self, name):
                raise ConfigError(f"{type(llm).__name__}'s submodule {name!r} clashes with a VLM attribute")
            self.add_module(name, child)
        self.feature_norm = FeatureNorm(config.feature_norm, vision.width)
        grid = int(round(vision.num_tokens ** 0.5))
        if grid % config.token_merge:
            raise ConfigError(f"model.token_merge {config.token_merge} does not divide the encoder's "
                              f"{grid}x{grid} patch grid")
        self.projector = build_projector(config.projector, vision.width * config.token_merge ** 2, self.llm_width)

    def train(self, mode: bool = True) -> "VLM":
        super().train(mode)
        self.llm.train(mode)  # the LLM object's own flag (its children are switched already)
        return self

    @property
    def llm_width(self) -> int:
        return int(self.llm.get_input_embeddings().weight.shape[1])

    @property
    def num_image_tokens(self) -> int:
        """LLM positions per image: the patch grid, divided by ``token_merge`` squared."""
        return self.vision.num_tokens // self.config.token_merge ** 2

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def image_features(self, pixel_values: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """Projected features (n_images, N, llm width) of normalised images (n_images, 3, H, W)."""
        if pixel_values is None or pixel_values.numel() == 0:
            return None
        feats = merge_tokens(self.feature_norm(self.vision(pixel_values).float()), self.config.token_merge)
        return self.projector(feats.to(self.projector[0].weight.dtype))

    @torch.no_grad()
    def fit_feature_norm(self, pixel_values: torch.Tensor, batch_size: int = 64) -> None:
        """Measure ``feature_norm``'s statistics on normalised images (n, 3, H, W) (a no-op
        unless ``feature_norm`` is ``standardize``; :mod:`qlip.vlm.feature_norm`)."""
        if self.config.feature_norm != "standardize":
            return
        dev = self.feature_norm.mean.device
        feats = [self.vision(pixel_values[i:i + batch_size].to(dev)).float()
                 for i in range(0, pixel_values.shape[0], batch_size)]
        self.feature_norm.fit(torch.cat(feats))

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor]) -> torch.Tensor:
        return splice(self.llm.get_input_embeddings(), input_ids, self.image_features(pixel_values),
                      self.image_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        out = self.llm(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=attention_mask,
                       use_cache=False)
        return out.logits

    def meta(self) -> Dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": dataclasses.asdict(self.config),
                "image_token_id": self.image_token_id, "num_image_tokens": self.num_image_tokens,
                "vision_width": self.vision.width, "llm_width": self.llm_width}

    def save_pretrained(self, folder: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write the folder format of the module docstring (``state_dict``: the weights to write,
        e.g. gathered from a sharded model)."""
        from ..io import atomic_write_text, write_safetensors
        os.makedirs(folder, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().cpu() for k, v in sd.items()}
        seen: Dict[Any, str] = {}
        for k, v in list(sd.items()):  # safetensors refuses shared storage (tied embeddings): copy
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape)) if v.numel() else None
            if key is not None and key in seen:
                sd[k] = v.clone()
            elif key is not None:
                seen[key] = k
        llm_names = set(self.llm.state_dict())
        write_safetensors({k: v for k, v in sd.items() if k not in llm_names}, os.path.join(folder, "model.safetensors"))
        self.vision.qlip.save_pretrained(os.path.join(folder, "vision"))
        llm_dir = os.path.join(folder, "llm")
        os.makedirs(llm_dir, exist_ok=True)
        stale = os.path.join(llm_dir, "model.safetensors.index.json")  # format 2, if re-saving over one
        if os.path.isfile(stale):
            os.remove(stale)
        self.llm.config.save_pretrained(llm_dir)
        if getattr(self.llm, "generation_config", None) is not None:
            self.llm.generation_config.save_pretrained(llm_dir)
        self.tokenizer.save_pretrained(llm_dir)
        write_safetensors({k: v for k, v in sd.items() if k in llm_names}, os.path.join(llm_dir, "model.safetensors"))
        atomic_write_text(os.path.join(folder, "config.json"), json.dumps(self.meta(), indent=2) + "\n")


def export_llm(model: "VLM", folder: str) -> str:
    """A standalone Hugging Face folder of the VLM's language model and tokenizer (weights
    included), e.g. to publish or to fine-tune the LLM alone."""
    model.llm.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return folder


def enable_checkpointing(llm: nn.Module) -> None:
    """The LLM's activation checkpointing (transformers >= 5: ``activation_checkpointing_enable``;
    earlier: ``gradient_checkpointing_enable``)."""
    fn = getattr(llm, "activation_checkpointing_enable", None) or getattr(llm, "gradient_checkpointing_enable")
    fn()


def load_llm(name_or_path: str, weights: bool = True):
    """``(causal LM, tokenizer)`` from a folder or a hub id, or a one-line ConfigError (offline
    without the weights, not a causal LM, ...). Weights in float32 (cast for bf16 by autocast).
    ``weights=False``: the architecture from its config, randomly initialised (a saved VLM's
    weights are loaded afterwards from its own file)."""
    require_transformers_models()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
        if weights:
            llm = AutoModelForCausalLM.from_pretrained(name_or_path)
        else:
            llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name_or_path))
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ConfigError(f"language model {name_or_path!r} cannot be loaded ({first}); a hub id needs its "
                          f"files in the local Hugging Face cache when offline (HF_HUB_OFFLINE=1): "
                          f"download it first or give a folder") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"language model {name_or_path!r}: its tokenizer is not a fast tokenizer "
                          f"(the labels need token offsets)")
    return llm.float(), tok


def build_vlm(qlip_model, llm_name_or_path: str, config: Optional[VLMConfig] = None) -> VLM:
    """A fresh VLM: a QLIP model (or its folder / hub id), a causal LM (folder or hub id), a new projector."""
    config = (config or VLMConfig()).validate()
    if isinstance(qlip_model, str):
        from ..io import load as qlip_load
        qlip_model = qlip_load(qlip_model)
    tower = VisionTower(qlip_model.float(), layer=config.layer, features=config.features)
    llm, tok = load_llm(llm_name_or_path)
    return VLM(tower, llm, tok, config)


def read_meta(folder: str) -> Dict[str, Any]:
    meta = read_json(os.path.join(folder, "config.json"))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder}: not a qlip VLM folder (config.json format {meta.get('format')!r})")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise CheckpointError(f"{folder}: format_version {meta['format_version']} is newer than this qlip")
    return meta


def read_weights(folder: str, meta: Optional[Dict[str, Any]] = None) -> Dict[str, torch.Tensor]:
    """The VLM's state dict (LLM under its Hugging Face names, ``projector.*``, ``feature_norm.*``)
    from a saved folder of any format version: format 3 joins ``model.safetensors`` and
    ``llm/model.safetensors``; format 2 holds everything in ``model.safetensors``; format 1 keeps
    the LLM under ``llm.*`` and a second QLIP copy under ``vision.qlip.*`` (dropped here)."""
    from ..io import read_state_dict
    version = (meta if meta is not None else read_meta(folder)).get("format_version", 1)
    sd = read_state_dict(folder)
    if version == 1:
        return {k[len("llm."):] if k.startswith("llm.") else k: v for k, v in sd.items()
                if not k.startswith("vision.")}
    if version >= 3:
        llm = read_state_dict(os.path.join(folder, "llm"))
        both = sorted(set(sd) & set(llm))
        if both:
            raise CheckpointError(f"{folder}: {len(both)} weights stored both in model.safetensors and "
                                  f"llm/model.safetensors (e.g. {both[0]})")
        sd.update(llm)
    return sd


def load(folder: str, device: Optional[str] = None) -> VLM:
    """A VLM saved by :meth:`VLM.save_pretrained` (a training run's ``OUT/final`` or a checkpoint)."""
    from ..io import load as qlip_load
    from ..io import load_state_dict_strict
    meta = read_meta(folder)
    try:
        cfg = VLMConfig(**meta["config"])
    except TypeError as e:
        raise CheckpointError(f"{folder}: bad VLM config ({e})") from None
    tower = VisionTower(qlip_load(os.path.join(folder, "vision")).float(), layer=cfg.layer, features=cfg.features)
    llm, tok = load_llm(os.path.join(folder, "llm"), weights=False)
    model = VLM(tower, llm, tok, cfg)
    if model.image_token_id != meta.get("image_token_id"):
        raise CheckpointError(f"{folder}: image token id {model.image_token_id} != saved {meta.get('image_token_id')}")
    load_state_dict_strict(model, read_weights(folder, meta), folder)
    model.eval()
    return model.to(device) if device else model
