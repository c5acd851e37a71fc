"""Initialising QLIP's towers from other models' weights: open_clip text towers and EVA-CLIP /
EVA-02 vision towers (the training recipe's keys ``model.init_open_clip`` and
``model.init_eva_clip`` call these; like the official-format adapter, weight conversion lives
in ``qlip.io``, below training).

The paper (section 4) initialises the text tower from a pre-trained CLIP text encoder and the
vision encoder from EVA-CLIP. Here:

* :func:`init_text_from_open_clip` copies an open_clip text tower into ``model.text``
  (``"ARCH:PRETRAINED"``, e.g. ``"ViT-B-16:openai"``; ``"ARCH"`` alone for open_clip's random
  init; ``"local-dir:/path"`` or ``"hf-hub:org/repo"`` for open_clip's own schemas). The logit
  scale is copied as well.
* :func:`init_visual_from_eva_clip` copies an EVA-CLIP / EVA-02 vision tower (a timm ``Eva``)
  into ``model.visual``: from an open_clip spec whose vision tower is a timm EVA
  (``"EVA02-B-16:merged2b_s8b_b131k"``, same schemas as above), from timm
  (``"timm:eva02_base_patch16_clip_224.merged2b"``, ``"timm:NAME:/weights.safetensors"``) or from
  a built ``timm.models.eva.Eva`` / open_clip model. The logit scale is not touched.

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

Mapping (timm ``Eva`` -> ``qlip VisionEncoder``)::

    patch_embed.proj                             -> patch_embed
    cls_token                     (1, 1, D)      -> cls_token (D,)
    pos_embed                     (1, 1+n, D)    -> pos_embed (1+N, D)  (bicubic resample if n != N)
    blocks.{i}.norm1 / .norm2                    -> transformer.blocks.{i}.ln1 / .ln2
      .attn.qkv (or q_proj|k_proj|v_proj)        -> .attn.qkv.weight        ([q; k; v] rows)
      .attn.q_bias / k_bias / v_bias             -> .attn.q_bias / k_bias / v_bias
      .attn.norm   (scale_attn_inner)            -> .attn.inner_ln          (sub-LN)
      .attn.proj                                 -> .attn.out
      .mlp.fc1_g / .mlp.fc1_x (SwiGLU)           -> .mlp.w1 / .mlp.w2      (silu(w1 x) * w2 x)
      .mlp.norm    (scale_mlp)                   -> .mlp.ffn_ln
      .mlp.fc2                                   -> .mlp.w3  (plain GELU MLP: fc1 / fc2 -> fc1 / fc2)
    norm (or fc_norm), then the cls token        -> ln_post
    head (timm) / visual.head.proj (open_clip)   -> proj    (left as is when absent or of another shape)

EVA-02's rotary embedding (``rope_type='cat'``: interleaved pairs, rows then columns, positions
``index / grid * 16``, class token skipped) is qlip's ``RoPE2D``; it holds no weights.

Everything that decides the function is checked first (widths, depth, heads, MLP width,
vocabulary, context length, embedding size, activation quick_gelu vs gelu, LayerNorm eps,
causal mask, pooling, biases, layer scale / custom blocks; for EVA also patch size, SwiGLU,
sub-LN, RoPE variant, qk-norm, global pool) and every mismatch is named in one ConfigError,
e.g. ``text.act: open_clip quick_gelu vs model gelu``; fix them with recipe ``model.overrides``
(``text.width``, ``vision.mlp_dim``, ...). Weights that cannot be fetched (offline) are a
one-line CheckpointError.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, ConfigError

__all__ = ["init_text_from_open_clip", "copy_open_clip_text_", "create_open_clip", "init_visual_from_eva_clip",
           "copy_eva_visual_", "create_timm_eva", "load_eva_clip", "resample_pos_embed"]


def _parse_spec(spec: str) -> Tuple[str, Any]:
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError("model.init_open_clip is empty; use ARCH:PRETRAINED, e.g. ViT-B-16:openai")
    if spec.startswith(("hf-hub:", "local-dir:")):
        return spec, None
    arch, _, tag = spec.partition(":")
    return arch.strip(), (tag.strip() or None)


def create_open_clip(spec: str, key: str = "model.init_open_clip") -> nn.Module:
    """Build the open_clip model named by ``spec`` ("ARCH:PRETRAINED", "ARCH", "local-dir:...",
    "hf-hub:..."). Unknown names -> ConfigError; weights that cannot be fetched -> CheckpointError.
    ``key`` names the recipe key in error messages."""
    try:
        import open_clip
    except ImportError:
        raise ConfigError(f"{key} needs open_clip: pip install open_clip_torch") from None
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


# ---- vision tower from EVA-CLIP / EVA-02 (a timm Eva) -----------------------------------------

EVA_SPEC_HELP = "e.g. EVA02-B-16:merged2b_s8b_b131k (open_clip) or timm:eva02_base_patch16_clip_224.merged2b"


def _import_timm():
    try:
        import timm
        import timm.models.eva  # noqa: F401
    except ImportError:
        raise ConfigError("model.init_eva_clip needs timm: pip install timm") from None
    return timm


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else e.__class__.__name__


def create_timm_eva(spec: str) -> nn.Module:
    """``"timm:NAME[.TAG]"`` -> that timm model with its pretrained weights (Hugging Face hub or
    cache); ``"timm:NAME[.TAG]:FILE"`` loads the weights from a local file instead."""
    timm = _import_timm()
    name, _, file = spec[len("timm:"):].partition(":")
    name, file = name.strip(), file.strip()
    if not timm.is_model(name):
        raise ConfigError(f"timm has no model {name!r} (see timm.list_models('eva02*clip*'))")
    if "." in name and not file and name not in timm.list_pretrained(name):
        tags = ", ".join(timm.list_pretrained(name.split(".")[0] + ".*")) or "none"
        raise ConfigError(f"timm has no pretrained weights {name!r} (available: {tags})")
    if file and not os.path.isfile(file):
        raise CheckpointError(f"model.init_eva_clip {spec}: no weights file {file}")
    kw = {"pretrained_cfg_overlay": {"file": file}} if file else {}
    try:
        model = timm.create_model(name, pretrained=True, **kw)
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot load timm weights {spec} ({_first_line(e)}); offline: put them in the "
                              "Hugging Face cache or use timm:NAME:/path/to/weights.safetensors") from None
    return model.eval()


def load_eva_clip(spec) -> Tuple[nn.Module, Optional[nn.Module], str, Dict[str, Any]]:
    """Resolve ``spec`` (a string, a timm Eva, an open_clip model or its TimmModel vision tower)
    into ``(trunk, projection, name, preprocess)``: the timm Eva, the module projecting its pooled
    feature (None or Identity when there is none), a name for messages, and the source's image
    mean / std when it says."""
    _import_timm()
    from timm.models.eva import Eva
    if isinstance(spec, nn.Module):
        module, name = spec, type(spec).__name__
    else:
        spec = (spec or "").strip()
        if not spec:
            raise ConfigError(f"model.init_eva_clip is empty; {EVA_SPEC_HELP}")
        module = create_timm_eva(spec) if spec.startswith("timm:") else create_open_clip(spec, "model.init_eva_clip")
        name = spec
    visual = getattr(module, "visual", module)   # open_clip CLIP -> its vision tower
    trunk = getattr(visual, "trunk", visual)     # open_clip TimmModel -> the timm model
    if not isinstance(trunk, Eva):
        raise ConfigError(f"{name}: the vision tower is {type(trunk).__name__}, not a timm EVA "
                          f"(timm.models.eva.Eva); {EVA_SPEC_HELP}")
    proj = trunk.head
    if visual is not trunk:
        # open_clip TimmModel: timm_proj null keeps the projection in trunk.head; "linear" / "mlp"
        # put it in visual.head (and trunk.head is then Identity)
        extra = [m for m in visual.head.children() if not isinstance(m, nn.Dropout)]
        if extra:
            proj = extra[0] if len(extra) == 1 else visual.head
    cfg = getattr(trunk, "pretrained_cfg", None) or {}
    mean = getattr(visual, "image_mean", None) or cfg.get("mean")
    std = getattr(visual, "image_std", None) or cfg.get("std")
    preprocess = {"mean": tuple(mean), "std": tuple(std)} if mean and std else {}
    return trunk, proj, name, preprocess


def _identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _eva_qkv(attn: nn.Module) -> Tuple[torch.Tensor, List[Optional[torch.Tensor]]]:
    """Fused ``[q; k; v]`` weight (3D, D) and the q, k, v biases (None where absent) of an EvaAttention,
    fused (``qkv`` + ``q_bias``/``k_bias``/``v_bias``) or not (``q_proj``/``k_proj``/``v_proj``)."""
    if attn.qkv is not None:
        return attn.qkv.weight, [attn.q_bias, attn.k_bias, attn.v_bias]
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    return torch.cat([p.weight for p in parts]), [p.bias for p in parts]


def _eva_mlp(mlp: nn.Module) -> Dict[str, Any]:
    """The MLP of an EvaBlock as ``{kind, hidden, act, problem, w1, w2, w3 / fc1, fc2}`` (Linear-like pairs
    ``(weight, bias)``); kind is "swiglu" (separate fc1_g / fc1_x), "glu" (packed fc1) or "mlp"."""
    kind = type(mlp).__name__
    pair = lambda lin: (lin.weight, lin.bias)  # noqa: E731
    if kind == "SwiGLU":
        ok = isinstance(mlp.act, nn.SiLU)
        return {"kind": "swiglu", "hidden": mlp.fc1_g.out_features, "w1": pair(mlp.fc1_g), "w2": pair(mlp.fc1_x),
                "w3": pair(mlp.fc2), "problem": None if ok else f"SwiGLU with {type(mlp.act).__name__} (not SiLU)"}
    if kind == "GluMlp":
        # act(first half) * second half when gate_last is False (timm SwiGLUPacked)
        ok = isinstance(mlp.act, nn.SiLU) and not mlp.gate_last
        H = mlp.fc1.out_features // 2
        w, b = mlp.fc1.weight, mlp.fc1.bias
        split = lambda t, j: None if t is None else t[j * H:(j + 1) * H]  # noqa: E731
        return {"kind": "glu", "hidden": H, "w1": (split(w, 0), split(b, 0)), "w2": (split(w, 1), split(b, 1)),
                "w3": pair(mlp.fc2), "problem": None if ok else "packed GLU MLP other than SiLU with the gate first"}
    if kind == "Mlp":
        return {"kind": "mlp", "hidden": mlp.fc1.out_features, "act": _act_name(mlp.act), "fc1": pair(mlp.fc1),
                "fc2": pair(mlp.fc2), "problem": None}
    return {"kind": kind, "hidden": None, "problem": f"MLP {kind} is not supported"}


def _eva_rope_problems(rope: nn.Module, head_dim: int, grid: int, pt_grid: int) -> List[str]:
    """Ways the timm rotary embedding differs from qlip's RoPE2D (interleaved pairs, rows then
    columns, token-index positions rescaled to a ``pt_grid`` reference grid, theta 10000)."""
    if type(rope).__name__ != "RotaryEmbeddingCat":
        return [f"rope {type(rope).__name__}: only rope_type 'cat' (EVA-02's) is supported"]
    out = []
    if getattr(rope, "rotate_half", False):
        out.append("rope rotate_half (half-split layout); QLIP rotates interleaved pairs")
    grid_type = getattr(rope, "grid_type", "pixel" if rope.in_pixels else "index")
    if grid_type != "index" or rope.in_pixels:
        out.append(f"rope on {grid_type!r} coordinates with {'pixel' if rope.in_pixels else 'inverse'}-frequency "
                   "bands; QLIP uses token indices and inverse frequencies")
    if getattr(rope, "grid_indexing", "ij") != "ij":
        out.append(f"rope grid_indexing {rope.grid_indexing!r} (QLIP: 'ij', rows first)")
    if float(getattr(rope, "grid_offset", 0.0)) != 0.0:
        out.append(f"rope grid_offset {rope.grid_offset} (QLIP: 0)")
    if float(rope.temperature) != 10000.0:
        out.append(f"rope temperature {rope.temperature} vs model 10000")
    if rope.dim != head_dim:
        out.append(f"rope dim {rope.dim} vs head dim {head_dim}")
    # positions are index / size * reference; without a reference, the raw index (= its own grid)
    ref = tuple(rope.ref_feat_shape or rope.feat_shape or (grid, grid))
    if ref != (pt_grid, pt_grid):
        out.append(f"rope reference grid {ref[0]}x{ref[1]} vs model {pt_grid}x{pt_grid} (ref_feat_shape)")
    return out


def resample_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """``[cls; g*g patches]`` position embedding (1 + g*g, D) -> (1 + grid*grid, D): the patch part
    resized as a 2D map with bicubic interpolation (antialiased when shrinking), cls row kept."""
    cls, patches = pos[:1], pos[1:]
    g = math.isqrt(patches.shape[0])
    if g == grid:
        return pos
    x = patches.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([cls, x.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)])


def copy_eva_visual_(model, trunk: nn.Module, proj: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Copy the timm Eva ``trunk`` (and its projection ``proj``) into ``model.visual`` in place.

    Everything that decides the function is checked first and every mismatch is named in one
    ConfigError. Returns ``{"tensors", "pos_embed", "proj", "notes"}`` describing what was done.
    """
    v, visual, cfg = model.config.vision, model.visual, model.config
    D, grid, blocks = trunk.embed_dim, cfg.grid, list(trunk.blocks)
    problems: List[str] = []
    notes: List[str] = []

    def bad(msg: str) -> None:
        if msg not in problems:
            problems.append(msg)

    def check(name: str, theirs, ours) -> None:
        if theirs != ours:
            bad(f"{name}: EVA {theirs} vs model {ours}")

    # ---- embedding, pooling, final norm
    check("vision.width", D, v.width)
    check("vision.depth", len(blocks), v.depth)
    pe = trunk.patch_embed
    (ph, pw), (gh, gw) = pe.patch_size, pe.grid_size
    if ph != pw or gh != gw:
        bad(f"non-square EVA patches {ph}x{pw} / grid {gh}x{gw}")
    check("vision.patch_size", ph, v.patch_size)
    check("vision.stem", "patch", getattr(v, "stem", "patch"))
    if not _identity(getattr(pe, "norm", None)) or pe.proj.bias is None:
        bad("EVA patch embedding with a norm or without a bias (use_pre_transformer_norm) is not supported")
    if not _identity(getattr(trunk, "norm_pre", None)):
        bad("EVA pre-transformer norm is not supported")
    if trunk.cls_token is None or trunk.num_prefix_tokens != 1:
        bad("EVA needs exactly one prefix token, the class token (no register tokens)")
    if trunk.pos_embed is None or trunk.no_embed_class:
        bad("EVA needs a learned position embedding that includes the class token (use_abs_pos_emb, "
            "not no_embed_class)")
    if trunk.global_pool != "token" or trunk.attn_pool is not None:
        bad(f"EVA global pool {trunk.global_pool!r}: only 'token' (the class token, as EVA-CLIP) is supported")
    final = [n for n in (trunk.norm, trunk.fc_norm) if not _identity(n)]
    if len(final) != 1:
        bad(f"EVA needs exactly one final norm (norm or fc_norm), it has {len(final)}")
    norms = list(final)

    # ---- rotary embedding
    check("vision.rope", trunk.rope is not None, v.rope)
    if trunk.rope is not None and v.rope:
        pt_grid = visual.rope.pt_grid
        for msg in _eva_rope_problems(trunk.rope, D // blocks[0].attn.num_heads if blocks else D, grid, pt_grid):
            bad(msg)
    if getattr(trunk, "rope_mixed", False):
        bad("EVA mixed (learned per-layer) RoPE is not supported")

    # ---- blocks
    parts = []
    for blk in blocks:
        if type(blk).__name__ != "EvaBlock" or type(blk.attn).__name__ != "EvaAttention":
            bad(f"EVA {type(blk).__name__} / {type(blk.attn).__name__} blocks are not supported "
                "(only pre-norm EvaBlock with EvaAttention: no use_post_norm, attn_type 'eva')")
            continue
        attn, mlp = blk.attn, _eva_mlp(blk.mlp)
        check("vision.heads", attn.num_heads, v.heads)
        if attn.head_dim * attn.num_heads != D:
            bad(f"EVA attention width {attn.head_dim * attn.num_heads} != width {D} (attn_head_dim)")
        if getattr(blk, "gamma_1", None) is not None or getattr(blk, "gamma_2", None) is not None:
            bad("EVA layer scale (gamma_1 / gamma_2, init_values) is not supported")
        if not _identity(attn.q_norm) or not _identity(attn.k_norm):
            bad("EVA qk_norm is not supported")
        if getattr(attn, "gate", None) is not None:
            bad("EVA gated attention is not supported")
        if getattr(attn, "rotate_half", False) and trunk.rope is not None:
            bad("rope rotate_half (half-split layout); QLIP rotates interleaved pairs")
        check("vision.subln (attention inner norm, scale_attn_inner)", not _identity(attn.norm), v.subln)
        check("vision.subln (MLP norm, scale_mlp)", not _identity(blk.mlp.norm), v.subln)
        check("vision.swiglu", mlp["kind"] in ("swiglu", "glu"), v.swiglu)
        check("vision.mlp_dim", mlp["hidden"], v.mlp_dim)
        if mlp["problem"]:
            bad("EVA " + mlp["problem"])
        if mlp["kind"] == "mlp" and not v.swiglu:
            check("vision.act", mlp["act"], v.act)
        qkv_w, biases = _eva_qkv(attn)
        for name, b in zip(("q_bias", "k_bias", "v_bias"), biases):
            # a bias the model lacks must be absent (q, v) or zero (timm's k_bias buffer) in EVA
            if b is not None and not getattr(v, name) and (name != "k_bias" or b.abs().max() > 0):
                bad(f"vision.{name}: EVA has a {name[0]} bias, model has none")
        norms += [blk.norm1, blk.norm2, attn.norm, blk.mlp.norm]
        parts.append((blk, qkv_w, biases, mlp))
    for n in norms:
        if _identity(n):
            continue
        if not isinstance(n, nn.LayerNorm) or n.weight is None or n.bias is None:
            bad(f"EVA {type(n).__name__} norms (not LayerNorm with weight and bias) are not supported")
        else:
            check("vision.ln_eps", float(n.eps), float(v.ln_eps))

    # ---- projection: copied when it is a Linear of the model's shape, else left as is
    copy_proj = False
    if _identity(proj):
        notes.append("proj left as is: the source has no projection")
    elif not isinstance(proj, nn.Linear):
        notes.append(f"proj left as is: the source projection is {type(proj).__name__}, not a Linear")
    elif tuple(proj.weight.shape) != tuple(visual.proj.weight.shape):
        notes.append(f"proj left as is: the source projects {proj.in_features} -> {proj.out_features}, "
                     f"the model {v.width} -> {cfg.embed_dim}")
    else:
        copy_proj = True
        if proj.bias is not None and visual.proj.bias is None:
            bad("vision.projection_bias: EVA True vs model False")
    if problems:
        raise ConfigError("EVA vision tower does not match model.visual: " + "; ".join(problems))

    # ---- the new state dict of model.visual
    new: Dict[str, torch.Tensor] = {}

    def put(name: str, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, has_bias: bool = True) -> None:
        new[name + ".weight"] = weight
        if has_bias:
            new[name + ".bias"] = bias if bias is not None else torch.zeros(weight.shape[0])

    put("patch_embed", pe.proj.weight, pe.proj.bias)
    new["cls_token"] = trunk.cls_token.reshape(D)
    new["pos_embed"] = resample_pos_embed(trunk.pos_embed.reshape(-1, D), grid)
    put("ln_post", final[0].weight, final[0].bias)
    for i, (blk, qkv_w, biases, mlp) in enumerate(parts):
        p = f"transformer.blocks.{i}."
        put(p + "ln1", blk.norm1.weight, blk.norm1.bias)
        put(p + "ln2", blk.norm2.weight, blk.norm2.bias)
        new[p + "attn.qkv.weight"] = qkv_w
        for name, b in zip(("q_bias", "k_bias", "v_bias"), biases):
            if getattr(v, name):
                new[p + "attn." + name] = b if b is not None else torch.zeros(D)
        put(p + "attn.out", blk.attn.proj.weight, blk.attn.proj.bias)
        if v.subln:
            put(p + "attn.inner_ln", blk.attn.norm.weight, blk.attn.norm.bias)
            put(p + "mlp.ffn_ln", blk.mlp.norm.weight, blk.mlp.norm.bias)
        for ours, theirs in ((("w1", "w1"), ("w2", "w2"), ("w3", "w3")) if v.swiglu else
                             (("fc1", "fc1"), ("fc2", "fc2"))):
            put(p + "mlp." + ours, *mlp[theirs])
    if copy_proj:
        put("proj", proj.weight, proj.bias, has_bias=visual.proj.bias is not None)

    own = visual.state_dict()
    expected = {k for k in own if copy_proj or not k.startswith("proj.")}
    missing, extra = sorted(expected - set(new)), sorted(set(new) - set(own))
    if missing:
        bad("model.visual weights not provided by EVA: " + ", ".join(missing[:4]))
    if extra:
        bad("EVA weights with no place in model.visual: " + ", ".join(extra[:4]))
    for k, t in new.items():
        if k in own and tuple(own[k].shape) != tuple(t.shape):
            bad(f"vision {k}: EVA shape {tuple(t.shape)} vs model {tuple(own[k].shape)}")
    if problems:
        raise ConfigError("EVA vision tower does not match model.visual: " + "; ".join(problems))
    with torch.no_grad():
        for k, t in new.items():
            own[k].copy_(t.detach().to(own[k].dtype))
    g = math.isqrt(trunk.pos_embed.shape[1] - 1)
    return {"tensors": len(new),
            "pos_embed": "copied" if g == grid else f"resampled {g}x{g} -> {grid}x{grid} (bicubic)",
            "proj": "copied" if copy_proj else "left as is", "notes": notes}


def init_visual_from_eva_clip(model, spec) -> Dict[str, Any]:
    """Initialise ``model.visual`` from an EVA-CLIP / EVA-02 vision tower; returns a small report.

    ``spec``: an open_clip spec whose vision tower is a timm EVA (``"EVA02-B-16:merged2b_s8b_b131k"``,
    ``"ARCH"`` for open_clip's random init, ``"local-dir:/folder"``, ``"hf-hub:org/repo"``), a timm
    name ``"timm:eva02_base_patch16_clip_224.merged2b"`` (``"timm:NAME:/weights.safetensors"`` for a
    local file), or an already built ``timm.models.eva.Eva`` / open_clip model.
    The report: ``{"source", "tensors", "pos_embed", "proj", "notes"}``.
    """
    trunk, proj, name, preprocess = load_eva_clip(spec)
    report = {"source": name, **copy_eva_visual_(model, trunk, proj)}
    pp = model.config.preprocess
    for key in ("mean", "std"):
        theirs, ours = preprocess.get(key), tuple(getattr(pp, key))
        if theirs is not None and (len(theirs) != len(ours) or
                                   max(abs(a - b) for a, b in zip(theirs, ours)) > 1e-6):
            report["notes"].append(f"preprocess.{key}: EVA {tuple(theirs)} vs model {ours}")
    return report
