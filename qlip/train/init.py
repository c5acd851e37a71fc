"""Initialising towers from other models before training (recipe key ``model.init_open_clip``).

The paper (section 4) initialises the text tower from a pre-trained CLIP text encoder and the
vision encoder from EVA-CLIP. Here:

* :func:`init_text_from_open_clip` copies an open_clip text tower into ``model.text``
  (``"ARCH:PRETRAINED"``, e.g. ``"ViT-B-16:openai"``; ``"ARCH"`` alone for open_clip's random
  init; ``"local-dir:/path"`` or ``"hf-hub:org/repo"`` for open_clip's own schemas). The logit
  scale is copied as well.
* vision-tower initialisation from EVA-CLIP is **not implemented**
  (:func:`init_visual_from_eva_clip` raises a one-line ConfigError).

Mapping (open_clip ``CLIP`` / ``TextTransformer`` -> ``qlip TextEncoder``)::

    token_embedding.weight                       -> token_embed.weight
    positional_embedding          (S, Dt)        -> pos_embed
    transformer.resblocks.{i}.ln_1               -> transformer.blocks.{i}.ln1
      .attn.in_proj_weight        (3Dt, Dt)      -> .attn.qkv.weight        (same [q; k; v] row order)
      .attn.in_proj_bias          (3Dt,)         -> .attn.q_bias / k_bias / v_bias
      .attn.out_proj                             -> .attn.out
      .ln_2                                      -> .ln2
      .mlp.c_fc / .mlp.c_proj                    -> .mlp.fc1 / .mlp.fc2
    ln_final                                     -> ln_final
    text_projection               (Dt, P)        -> proj.weight = text_projection.T  (Linear: as is)
    logit_scale                                  -> logit_scale

Everything that decides the function is checked first (widths, depth, heads, MLP width,
vocabulary, context length, embedding size, activation quick_gelu vs gelu, LayerNorm eps,
causal mask, pooling, biases, layer scale / custom blocks) and every mismatch is named in one
ConfigError, e.g. ``text.act: open_clip quick_gelu vs model gelu``; fix them with recipe
``model.overrides`` (``text.width``, ``text.act``, ...).
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

__all__ = ["init_text_from_open_clip", "copy_open_clip_text_", "create_open_clip", "init_visual_from_eva_clip"]


def _parse_spec(spec: str) -> Tuple[str, Any]:
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError("model.init_open_clip is empty; use ARCH:PRETRAINED, e.g. ViT-B-16:openai")
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    arch, _, tag = spec.partition(":")
    return arch.strip(), (tag.strip() or None)


def create_open_clip(spec: str) -> nn.Module:
    """Build the open_clip model named by ``spec`` ("ARCH:PRETRAINED", "ARCH", "local-dir:...",
    "hf-hub:..."). Unknown names -> ConfigError; weights that cannot be fetched -> CheckpointError."""
    try:
        import open_clip
    except ImportError:
        raise ConfigError("model.init_open_clip needs open_clip: pip install open_clip_torch") from None
    arch, tag = _parse_spec(spec)
    if not arch.startswith(("hf-hub:", "local-dir:")):
        if open_clip.get_model_config(arch) is None:
            raise ConfigError(f"open_clip has no model {arch!r} (see open_clip.list_models())")
        if tag is not None and not _is_file(tag) and tag not in open_clip.list_pretrained_tags_by_model(arch):
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ConfigError(f"open_clip {arch} has no pretrained tag {tag!r} (available: {tags})")
    kw = {}
    if tag is not None and not arch.startswith(("hf-hub:", "local-dir:")):
        # OpenAI weights were trained with QuickGELU; open_clip only warns unless asked to use it
        kw["force_quick_gelu"] = bool((open_clip.get_pretrained_cfg(arch, tag) or {}).get("quick_gelu", False))
    try:
        model = open_clip.create_model(arch, pretrained=tag, device="cpu", **kw)
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        what = f"{arch}:{tag}" if tag else arch
        if tag is not None or arch.startswith(("hf-hub:", "local-dir:")):
            raise CheckpointError(f"cannot load open_clip weights {what} ({first[:300]}); offline: put them in "
                                  "the Hugging Face cache or use local-dir:/folder") from None
        raise ConfigError(f"cannot build open_clip model {what} ({first[:300]})") from None
    return model.eval()


def _is_file(path: str) -> bool:
    import os
    return os.path.isfile(path)


def _text_parts(oc: nn.Module) -> Dict[str, Any]:
    """The text tower of an open_clip CLIP (attributes on the model) or CustomTextCLIP (``.text``)."""
    tt = getattr(oc, "text", None)
    if tt is not None and hasattr(tt, "transformer") and hasattr(tt, "token_embedding"):
        return {"module": tt, "prefix": "text.", "pool": getattr(tt, "pool_type", "argmax"),
                "eos_id": getattr(tt, "eos_id", None), "attn_mask": getattr(tt, "attn_mask", None),
                "cls_emb": getattr(tt, "cls_emb", None), "proj": getattr(tt, "text_projection", None),
                "ln_final": tt.ln_final, "transformer": tt.transformer}
    if tt is not None:
        raise ConfigError(f"open_clip text tower {type(tt).__name__} (e.g. a Hugging Face text model) is not "
                          "a CLIP text transformer; only those can initialise model.text")
    if not hasattr(oc, "token_embedding"):
        raise ConfigError(f"{type(oc).__name__} has no CLIP text transformer")
    return {"module": oc, "prefix": "", "pool": getattr(oc, "text_pool_type", "argmax"),
            "eos_id": getattr(oc, "text_eos_id", None), "attn_mask": getattr(oc, "attn_mask", None),
            "cls_emb": None, "proj": getattr(oc, "text_projection", None),
            "ln_final": oc.ln_final, "transformer": oc.transformer}


def _act_name(mod: nn.Module) -> str:
    name = type(mod).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if isinstance(mod, nn.GELU):
        return "gelu" if mod.approximate == "none" else f"gelu(approximate={mod.approximate})"
    return name


def copy_open_clip_text_(model, oc: nn.Module) -> None:
    """Copy the text tower (and logit scale) of the open_clip model ``oc`` into ``model`` in place."""
    if model.text is None:
        raise ConfigError("model.init_open_clip: the model has no text tower (text dropped or config.text empty)")
    parts = _text_parts(oc)
    cfg, tcfg = model.config, model.config.text
    blocks = list(parts["transformer"].resblocks)
    problems: List[str] = []

    def check(name: str, theirs, ours) -> None:
        if theirs != ours:
            problems.append(f"{name}: open_clip {theirs} vs model {ours}")

    sd = {k[len(parts["prefix"]):]: v for k, v in oc.state_dict().items() if k.startswith(parts["prefix"])}
    tok = sd.get("token_embedding.weight")
    pos = sd.get("positional_embedding")
    if tok is None or pos is None:
        raise ConfigError("open_clip text tower lacks token_embedding / positional_embedding")
    check("text.vocab_size", tok.shape[0], tcfg.vocab_size)
    check("text.width", tok.shape[1], tcfg.width)
    check("text.context_length", pos.shape[0], tcfg.context_length)
    check("text.depth", len(blocks), tcfg.depth)
    if blocks:
        b0 = blocks[0]
        attn = getattr(b0, "attn", None)
        if not isinstance(attn, nn.MultiheadAttention):
            problems.append(f"open_clip attention {type(attn).__name__} (custom block) is not supported")
        else:
            check("text.heads", attn.num_heads, tcfg.heads)
        fc = getattr(getattr(b0, "mlp", None), "c_fc", None)
        if fc is None:
            problems.append("open_clip MLP without c_fc/c_proj is not supported")
        else:
            check("text.mlp_dim", fc.out_features, tcfg.mlp_dim)
            check("text.act", _act_name(b0.mlp.gelu), tcfg.act)
        if tcfg.swiglu or tcfg.subln:
            problems.append("model text tower uses swiglu/subln; open_clip CLIP text blocks use neither")
        for ls in ("ls_1", "ls_2"):
            if not isinstance(getattr(b0, ls, nn.Identity()), nn.Identity):
                problems.append("open_clip layer scale (ls_init_value) is not supported")
                break
        for extra in ("ln_attn", "ln_inner"):
            if not isinstance(getattr(b0, extra, nn.Identity()), nn.Identity):
                problems.append(f"open_clip {extra} (scale_attn/scale_fc) is not supported")
        check("text.ln_eps", float(b0.ln_1.eps), float(tcfg.ln_eps))
    check("text.ln_eps (ln_final)", float(parts["ln_final"].eps), float(tcfg.ln_eps))
    if parts["attn_mask"] is None:
        problems.append("open_clip text tower has no causal mask (no_causal_mask); ours is causal")
    if parts["cls_emb"] is not None:
        problems.append("open_clip embed_cls text towers are not supported")
    pool = parts["pool"]
    if pool == "argmax":
        # argmax of the ids is the first eos when eos is the largest id (the CLIP BPE tokenizer)
        if not (tcfg.legacy_pooling or tcfg.eos_token_id == tcfg.vocab_size - 1):
            problems.append(f"pooling: open_clip argmax vs model first eos id {tcfg.eos_token_id} "
                            "(set text.legacy_pooling true)")
    elif pool == "eos":
        if tcfg.legacy_pooling or parts["eos_id"] != tcfg.eos_token_id:
            problems.append(f"pooling: open_clip eos id {parts['eos_id']} vs model "
                            f"{'argmax' if tcfg.legacy_pooling else f'eos id {tcfg.eos_token_id}'}")
    else:
        problems.append(f"pooling: open_clip pool_type {pool!r} is not supported (argmax or eos)")
    proj = parts["proj"]
    if proj is None:
        problems.append("open_clip text tower has no text_projection")
        pw, pb = None, None
    elif isinstance(proj, nn.Linear):
        pw, pb = proj.weight.detach(), (proj.bias.detach() if proj.bias is not None else None)
    else:
        pw, pb = proj.detach().t(), None
    if pw is not None:
        check("embed_dim", pw.shape[0], cfg.embed_dim)
        check("text.projection_bias", pb is not None, tcfg.projection_bias)
    if getattr(oc, "logit_bias", None) is not None:
        problems.append("open_clip model has a logit_bias (SigLIP); QLIP uses the softmax CLIP loss")
    if problems:
        raise ConfigError("open_clip text tower does not match model.text: " + "; ".join(problems))

    new: Dict[str, torch.Tensor] = {"token_embed.weight": tok, "pos_embed": pos,
                                    "ln_final.weight": sd["ln_final.weight"], "ln_final.bias": sd["ln_final.bias"],
                                    "proj.weight": pw}
    if pb is not None:
        new["proj.bias"] = pb
    used = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
            "text_projection", "text_projection.weight", "text_projection.bias", "logit_scale", "attn_mask"}
    D = tcfg.width
    for i in range(len(blocks)):
        src, dst = f"transformer.resblocks.{i}.", f"transformer.blocks.{i}."
        m = {"ln_1.weight": "ln1.weight", "ln_1.bias": "ln1.bias", "ln_2.weight": "ln2.weight", "ln_2.bias": "ln2.bias",
             "attn.in_proj_weight": "attn.qkv.weight", "attn.out_proj.weight": "attn.out.weight",
             "attn.out_proj.bias": "attn.out.bias", "mlp.c_fc.weight": "mlp.fc1.weight",
             "mlp.c_fc.bias": "mlp.fc1.bias", "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias"}
        for a, b in m.items():
            new[dst + b] = sd[src + a]
            used.add(src + a)
        bias = sd.get(src + "attn.in_proj_bias")
        used.add(src + "attn.in_proj_bias")
        for j, name in enumerate(("q_bias", "k_bias", "v_bias")):
            part = bias[j * D:(j + 1) * D] if bias is not None else torch.zeros(D)
            if getattr(tcfg, name):
                new[dst + "attn." + name] = part
            elif part.abs().max() > 0:
                problems.append(f"text.{name}: open_clip block {i} has a non-zero {name[0]} bias, model has none")
    unused = sorted(k for k in sd if not k.startswith("visual.") and k not in used)
    if unused:
        problems.append("open_clip text weights with no place in model.text: " + ", ".join(unused[:4])
                        + (f" (+{len(unused) - 4} more)" if len(unused) > 4 else ""))
    own = model.text.state_dict()
    missing = sorted(set(own) - set(new))
    if missing:
        problems.append("model.text weights not provided by open_clip: " + ", ".join(missing[:4]))
    for k, v in new.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            problems.append(f"text.{k}: open_clip shape {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    if problems:
        raise ConfigError("open_clip text tower does not match model.text: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(new[k].to(v.dtype))
        if "logit_scale" in sd:
            model.logit_scale.copy_(sd["logit_scale"].reshape(()).to(model.logit_scale.dtype))


def init_text_from_open_clip(model, spec: str) -> nn.Module:
    """Initialise ``model.text`` (and ``model.logit_scale``) from open_clip; returns the open_clip model.

    ``spec``: ``"ARCH:PRETRAINED"`` (e.g. ``"ViT-B-16:openai"``), ``"ARCH"`` (open_clip's random
    init), ``"local-dir:/folder"`` or ``"hf-hub:org/repo"``. OpenAI CLIP text towers use QuickGELU:
    set ``text.act: quick_gelu`` (recipe ``model.overrides``) to match them.
    """
    if model.text is None:
        raise ConfigError("model.init_open_clip: the model has no text tower")
    oc = create_open_clip(spec)
    copy_open_clip_text_(model, oc)
    return oc


def init_visual_from_eva_clip(model, spec: str) -> None:
    """Not implemented: the paper initialises the vision encoder from EVA-CLIP."""
    raise ConfigError("initialising the vision encoder from EVA-CLIP is not implemented; "
                      "start from a qlip checkpoint with model.init (e.g. a released QLIP model) instead")
