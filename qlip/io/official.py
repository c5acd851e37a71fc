"""The official NVIDIA QLIP checkpoint format (Hugging Face ``QLIPModel``), in and out.

Facts of the format are in docs/official-format.md. The official config classes leave most
fields to class defaults, so :func:`config_from_official` applies those defaults to every
missing field. State dicts are renamed key by key; the separate q/k/v projections are fused
into our ``qkv`` matrix, and the aliased RoPE buffers (``*.rope.freqs_cos/sin``) are dropped and
recomputed.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import torch

from ..errors import CheckpointError, ConfigError
from ..model.config import QLIPConfig
from ..nn import rope_2d_table

# defaults of the official QLIPTextConfig / QLIPVisionConfig / QLIPDecoderConfig classes
_TOWER_DEFAULTS = dict(hidden_act="gelu", layer_norm_eps=1e-5, q_bias=True, k_bias=True, v_bias=True,
                       subln=False, swiglu=False, rope=False)
TEXT_DEFAULTS = dict(_TOWER_DEFAULTS, vocab_size=49408, hidden_size=512, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                     pad_token_id=1, bos_token_id=49406, eos_token_id=49407)
VISION_DEFAULTS = dict(_TOWER_DEFAULTS, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, image_size=224, patch_size=32, quantizer="none",
                       quantizer_l2_norm=False, quantizer_embed_type="identity", hidden_size_post_q=None,
                       quantizer_cfg={})
DECODER_DEFAULTS = dict(VISION_DEFAULTS)
BSQ_DEFAULTS = dict(embed_dim=18, group_size=9, beta=0.0, gamma_0=1.0, gamma_1=1.0, inv_temperature=100.0,
                    l2_norm=True, persample_entropy_compute="group", soft_entropy=True, input_format="bchw")
TOP_DEFAULTS = dict(projection_dim=512, logit_scale_init_value=2.6592)
_ACTS = {"gelu": "gelu", "quick_gelu": "quick_gelu"}


def is_official_config(d: Dict[str, Any]) -> bool:
    return "vision_config" in d and "format" not in d


def _tower(c: Dict[str, Any], name: str) -> Dict[str, Any]:
    act = c["hidden_act"]
    if act not in _ACTS:
        raise ConfigError(f"{name}: hidden_act {act!r} is not supported (gelu, quick_gelu)")
    return dict(width=c["hidden_size"], depth=c["num_hidden_layers"], heads=c["num_attention_heads"],
                mlp_dim=c["intermediate_size"], q_bias=bool(c["q_bias"]), k_bias=bool(c["k_bias"]),
                v_bias=bool(c["v_bias"]), swiglu=bool(c["swiglu"]), subln=bool(c["subln"]),
                rope=bool(c["rope"]), act=_ACTS[act], ln_eps=float(c["layer_norm_eps"]))


def config_from_official(d: Dict[str, Any], state_keys=None, preprocessor: Dict[str, Any] = None) -> QLIPConfig:
    """Official ``config.json`` dict (+ optional state-dict keys, preprocessor config) -> QLIPConfig.

    ``vision_projection_bias`` / ``text_projection_bias`` are not declared by the official config
    class; when a config lacks them they are inferred from the weights (``state_keys``).
    """
    top = dict(TOP_DEFAULTS, **d)
    v = dict(VISION_DEFAULTS, **top.get("vision_config", {}))
    dec = dict(DECODER_DEFAULTS, **top.get("decoder_config", {}))
    t = dict(TEXT_DEFAULTS, **top.get("text_config", {})) if top.get("text_config", True) is not None else None
    if v["quantizer"] != "bsq":
        raise ConfigError(f"vision_config.quantizer is {v['quantizer']!r}; only 'bsq' builds a working QLIP")
    q = dict(BSQ_DEFAULTS, **(v.get("quantizer_cfg") or {}))
    embed_type = v["quantizer_embed_type"] if v["quantizer_embed_type"] == "mlp" else "identity"
    post_q = v["hidden_size_post_q"] or v["hidden_size"]
    if post_q != dec["hidden_size"]:
        raise ConfigError(f"vision hidden_size_post_q {post_q} != decoder hidden_size {dec['hidden_size']}")
    if dec["image_size"] // dec["patch_size"] != v["image_size"] // v["patch_size"]:
        raise ConfigError("decoder and vision configs have different token grids: "
                          f"{dec['image_size']}/{dec['patch_size']} vs {v['image_size']}/{v['patch_size']}")
    if dec["patch_size"] != v["patch_size"]:
        raise ConfigError(f"decoder patch_size {dec['patch_size']} != vision patch_size {v['patch_size']}")
    keys = set(state_keys or ())

    def proj_bias(flag, key):
        if flag in top:
            return bool(top[flag])
        return key in keys

    vision = dict(_tower(v, "vision_config"), image_size=v["image_size"], patch_size=v["patch_size"],
                  projection_bias=proj_bias("vision_projection_bias", "visual_projection.bias"))
    decoder = dict(_tower(dec, "decoder_config"))
    text = None
    if t is not None:
        text = dict(_tower(t, "text_config"), vocab_size=t["vocab_size"], context_length=t["max_position_embeddings"],
                    eos_token_id=t["eos_token_id"], legacy_pooling=t["eos_token_id"] == 2,
                    projection_bias=proj_bias("text_projection_bias", "text_projection.bias"))
        text["rope"] = False  # the official text tower ignores its rope flag
    quant = dict(bits=q["embed_dim"], group_size=q["group_size"], inv_temperature=q["inv_temperature"],
                 l2_norm=bool(q["l2_norm"]), input_l2_norm=bool(v["quantizer_l2_norm"]), beta=q["beta"],
                 gamma_0=q["gamma_0"], gamma_1=q["gamma_1"], persample_entropy=q["persample_entropy_compute"],
                 embed_type=embed_type)
    pre = preprocess_from_official(preprocessor, v["image_size"])
    return QLIPConfig.from_dict(dict(vision=vision, decoder=decoder, quantizer=quant, text=text,
                                     embed_dim=top["projection_dim"],
                                     logit_scale_init=top["logit_scale_init_value"], preprocess=pre))


_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def preprocess_from_official(p: Dict[str, Any], image_size: int) -> Dict[str, Any]:
    """``preprocessor_config.json`` of ``CLIPImageProcessor`` -> our PreprocessConfig dict."""
    out = dict(resize=image_size, crop=image_size)
    if not p:
        return out
    size = p.get("size", image_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height", image_size))
    crop = p.get("crop_size", image_size)
    if isinstance(crop, dict):
        crop = crop.get("height", image_size)
    if not p.get("do_center_crop", True):
        crop = size
    out.update(resize=int(size), crop=int(crop))
    if crop != image_size:
        raise ConfigError(f"preprocessor crop_size {crop} != model image_size {image_size}")
    if "image_mean" in p:
        out["mean"] = list(p["image_mean"])
    if "image_std" in p:
        out["std"] = list(p["image_std"])
    out["interpolation"] = _RESAMPLE.get(p.get("resample", 3), "bicubic")
    return out


def config_to_official(cfg: QLIPConfig) -> Dict[str, Any]:
    """Our config -> an official ``config.json`` dict with every field written out."""
    def tower(b, extra):
        return dict(hidden_size=b.width, num_hidden_layers=b.depth, num_attention_heads=b.heads,
                    intermediate_size=b.mlp_dim, q_bias=b.q_bias, k_bias=b.k_bias, v_bias=b.v_bias,
                    swiglu=b.swiglu, subln=b.subln, rope=b.rope, hidden_act=b.act, layer_norm_eps=b.ln_eps,
                    attention_dropout=0.0, post_layernorm=False, **extra)
    v, dec, q = cfg.vision, cfg.decoder, cfg.quantizer
    if v.stem != "patch":
        raise ConfigError(f"the official format has only the patchify stem; this model has vision.stem {v.stem!r}")
    if dec.head != "linear":
        raise ConfigError(f"the official format has only the linear pixel head; this model has decoder.head {dec.head!r}")
    if dec.head_dim and dec.head_dim != dec.mlp_dim:
        raise ConfigError("the official format ties the decoder head width to intermediate_size; "
                          f"this model has head_dim {dec.head_dim} != mlp_dim {dec.mlp_dim}")
    quant_cfg = dict(embed_dim=q.bits, group_size=q.group_size, inv_temperature=q.inv_temperature,
                     l2_norm=q.l2_norm, beta=q.beta, gamma_0=q.gamma_0, gamma_1=q.gamma_1,
                     persample_entropy_compute=q.persample_entropy, soft_entropy=True, input_format="blc")
    vision = tower(v, dict(model_type="clip_vision_model", image_size=v.image_size, patch_size=v.patch_size,
                           num_channels=3, projection_dim=cfg.embed_dim, quantizer="bsq", quantizer_cfg=quant_cfg,
                           quantizer_embed_type=q.embed_type, quantizer_l2_norm=q.input_l2_norm,
                           hidden_size_post_q=dec.width))
    decoder = tower(dec, dict(model_type="clip_decoder_model", image_size=v.image_size, patch_size=v.patch_size,
                              num_channels=3, hidden_size_post_q=dec.width))
    out = dict(architectures=["QLIPModel"], model_type="clip", projection_dim=cfg.embed_dim,
               logit_scale_init_value=cfg.logit_scale_init, initializer_factor=1.0,
               vision_config=vision, decoder_config=decoder,
               vision_projection_bias=v.projection_bias)
    if cfg.text is not None:
        t = cfg.text
        if t.legacy_pooling and t.eos_token_id != 2:
            raise ConfigError("legacy (argmax) text pooling is written as eos_token_id 2 in the official format")
        out["text_config"] = tower(t, dict(model_type="clip_text_model", vocab_size=t.vocab_size,
                                           max_position_embeddings=t.context_length, eos_token_id=t.eos_token_id,
                                           bos_token_id=0 if t.legacy_pooling else 49406,
                                           projection_dim=cfg.embed_dim))
        out["text_projection_bias"] = t.projection_bias
    return out


def preprocessor_to_official(cfg: QLIPConfig) -> Dict[str, Any]:
    p = cfg.preprocess
    inv = {v: k for k, v in _RESAMPLE.items()}
    return dict(crop_size=p.crop, do_center_crop=True, do_normalize=True, do_resize=True,
                image_mean=list(p.mean), image_std=list(p.std), resample=inv.get(p.interpolation, 3),
                size=p.resize, image_processor_type="CLIPImageProcessor")


# ---- state dicts ---------------------------------------------------------------------------
_PREFIX = [  # (official, ours), most specific first
    ("text_model.embeddings.token_embedding.weight", "text.token_embed.weight"),
    ("text_model.embeddings.position_embedding.weight", "text.pos_embed"),
    ("text_model.encoder.layers.", "text.transformer.blocks."),
    ("text_model.final_layer_norm.", "text.ln_final."),
    ("text_projection.", "text.proj."),
    ("vision_model.embeddings.class_embedding", "visual.cls_token"),
    ("vision_model.embeddings.patch_embedding.", "visual.patch_embed."),
    ("vision_model.embeddings.position_embedding.weight", "visual.pos_embed"),
    ("vision_model.encoder.layers.", "visual.transformer.blocks."),
    ("vision_model.post_layernorm.", "visual.ln_post."),
    ("visual_projection.", "visual.proj."),
    ("vision_model.quant_embed.c_fc.", "bottleneck.down.fc."),
    ("vision_model.quant_embed.c_proj.", "bottleneck.down.proj."),
    ("vision_model.quant_embed_post.c_fc.", "bottleneck.up.fc."),
    ("vision_model.quant_embed_post.c_proj.", "bottleneck.up.proj."),
    ("vision_decoder.position_embeddings", "decoder.pos_embed"),
    ("vision_decoder.encoder.layers.", "decoder.transformer.blocks."),
    ("vision_decoder.norm.", "decoder.norm."),
    ("vision_decoder.ffn.0.", "decoder.head_fc."),
    ("vision_decoder.conv_out.", "decoder.head_out."),
    ("logit_scale", "logit_scale"),
]
_BLOCK = [("layer_norm1.", "ln1."), ("layer_norm2.", "ln2."), ("self_attn.inner_attn_ln.", "attn.inner_ln."),
          ("self_attn.out_proj.", "attn.out."), ("mlp.", "mlp.")]
_QKV = re.compile(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_DROP = re.compile(r"(\.rope\.freqs_(cos|sin)$)|(position_ids$)")


def _rename(key: str, table) -> str:
    for a, b in table:
        if key.startswith(a):
            return b + key[len(a):]
    raise CheckpointError(f"unexpected key in checkpoint: {key}")


def state_dict_from_official(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official key names -> ours (q/k/v fused; RoPE tables and position_ids dropped)."""
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, val in sd.items():
        if _DROP.search(key):
            continue
        m = _QKV.match(key)
        if m:
            block, which, kind = m.groups()
            if kind == "weight":
                qkv.setdefault(block, {})[which] = val
            else:
                out[_rename(block, _PREFIX) + f".attn.{which}_bias"] = val
            continue
        new = _rename(key, _PREFIX)
        for marker in ("transformer.blocks.",):
            if marker in new:
                head, tail = new.split(marker, 1)
                idx, rest = tail.split(".", 1)
                new = f"{head}{marker}{idx}." + _rename(rest, _BLOCK)
        out[new] = val
    for block, parts in qkv.items():
        missing = [w for w in "qkv" if w not in parts]
        if missing:
            raise CheckpointError(f"{block}.self_attn is missing {', '.join(w + '_proj.weight' for w in missing)}")
        out[_rename(block, _PREFIX) + ".attn.qkv.weight"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def state_dict_to_official(sd: Dict[str, torch.Tensor], cfg: QLIPConfig) -> Dict[str, torch.Tensor]:
    """Our key names -> official ones; adds the RoPE tables the official code stores."""
    inv_prefix = [(b, a) for a, b in _PREFIX]
    inv_block = [(b, a) for a, b in _BLOCK]
    out: Dict[str, torch.Tensor] = {}
    for key, val in sd.items():
        m = re.match(r"^(.*\.transformer\.blocks\.\d+)\.(.*)$", key)
        if m:
            block, rest = m.groups()
            off_block = _rename(block + ".", inv_prefix)[:-1]
            if rest == "attn.qkv.weight":
                for name, part in zip("qkv", val.chunk(3, dim=0)):
                    out[f"{off_block}.self_attn.{name}_proj.weight"] = part.clone()
                continue
            bm = re.match(r"^attn\.([qkv])_bias$", rest)
            if bm:
                out[f"{off_block}.self_attn.{bm.group(1)}_proj.bias"] = val
                continue
            out[f"{off_block}.{_rename(rest, inv_block)}"] = val
            continue
        out[_rename(key, inv_prefix)] = val
    for tower, bc in (("vision_model", cfg.vision), ("vision_decoder", cfg.decoder)):
        if bc.rope:
            cos, sin = rope_2d_table(bc.width // bc.heads, cfg.grid)
            out[f"{tower}.rope.freqs_cos"], out[f"{tower}.rope.freqs_sin"] = cos, sin
    return out
