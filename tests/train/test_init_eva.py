"""model.init_eva_clip: EVA-CLIP / EVA-02 vision towers (timm Eva) copied into model.visual.

Offline: tiny timm Evas with random weights built like timm's eva02_*_clip_* models (unfused qkv
with q/v biases, SwiGLU with the MLP norm, attention sub-LN, 2D RoPE on a 16x16 reference grid,
class-token pooling after the final norm, a Linear head as the CLIP projection).
"""
import json
import math
import time

import pytest
import torch

from qlip.errors import CheckpointError, ConfigError

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
from timm.models.eva import Eva  # noqa: E402

# qlip-tiny's vision tower: 32 px, patch 8, width 64, depth 2, 4 heads, SwiGLU width 160, embed 32
EVA_TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.5, qkv_fused=False,
                swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True,
                ref_feat_shape=(16, 16), global_pool="token", num_classes=32)
TIMM_NAME = "qlip_test_eva02_tiny_clip"
OC_ARCH = "qlip-test-eva02-tiny"
OC_CFG = {"embed_dim": 32, "custom_text": True,
          "vision_cfg": {"image_size": 32, "timm_model_name": TIMM_NAME, "timm_model_pretrained": False,
                         "timm_pool": "token", "timm_proj": None},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2,
                       "mlp_ratio": 2.0}}


def _eva(seed=0, **overrides):
    """A tiny timm Eva with every parameter random and non-trivial (norms, biases, cls, pos)."""
    torch.manual_seed(seed)
    m = Eva(**{**EVA_TINY, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2 and name not in ("pos_embed", "cls_token"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))   # norm scales
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))       # biases, cls, pos
    return m.eval()


def _qlip(**overrides):
    from qlip.model import QLIP, get_preset
    torch.manual_seed(0)
    return QLIP(get_preset("qlip-tiny", **overrides)).eval()


def _max_diff(a, b):
    return float((a - b).detach().abs().max())


def _assert_same_tower(model, eva, x):
    """Every block output, the final features and the pooled + projected embedding agree (1e-5),
    with the in-place RoPE of inference (no grad) and the autograd one."""
    with torch.no_grad():
        theirs_layers = eva.forward_intermediates(x, output_fmt="NLC", return_prefix_tokens=True,
                                                  intermediates_only=True)
        theirs_features = eva.forward_features(x)
        theirs_embed = eva.forward_head(theirs_features)
    fc_norm = not isinstance(eva.fc_norm, torch.nn.Identity)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            h, layers = model.visual(x, return_layers=True)
            features = h if fc_norm else model.visual.ln_post(h)
            embed = model.encode_image(x)
        assert len(layers) == len(theirs_layers)
        for (spatial, prefix), ours in zip(theirs_layers, layers):
            assert _max_diff(torch.cat([prefix, spatial], dim=1), ours) <= 1e-5
        assert _max_diff(theirs_features, features) <= 1e-5
        assert _max_diff(theirs_embed, embed) <= 1e-5
    assert float(theirs_embed.abs().max()) > 0.1 and float(theirs_features.std()) > 0.1  # not vacuous


VARIANTS = {
    # timm eva02_*_clip_*: separate q/k/v projections, SwiGLU (fc1_g, fc1_x) with its norm
    "eva02-clip": ({}, {}),
    # fused qkv (q_bias, zero k_bias buffer, v_bias) and the packed SwiGLU (no sub-LN)
    "fused-qkv-packed-swiglu": (dict(qkv_fused=True, scale_mlp=False, scale_attn_inner=False),
                                {"vision.subln": False}),
    # EVA-01-like GELU MLP with sub-LN, no RoPE, pooled cls through fc_norm instead of norm
    "gelu-mlp-fc-norm": (dict(swiglu_mlp=False, mlp_ratio=4.0, use_rot_pos_emb=False, use_fc_norm=True),
                         {"vision.swiglu": False, "vision.mlp_dim": 256, "vision.rope": False}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_eva_tower_matches_timm(variant):
    from qlip.io.init_weights import init_visual_from_eva_clip
    eva_kw, overrides = VARIANTS[variant]
    eva, model = _eva(**eva_kw), _qlip(**overrides)
    report = init_visual_from_eva_clip(model, eva)
    assert report["pos_embed"] == "copied" and report["proj"] == "copied" and report["notes"] == []
    assert report["tensors"] == len(model.visual.state_dict())
    _assert_same_tower(model, eva, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


def test_pos_embed_resampled_like_timm():
    """A 24 px EVA (3x3 grid) into the 32 px model (4x4): bicubic pos-embed resampling and the
    16x16 RoPE reference agree with timm's own set_input_size."""
    from qlip.io.init_weights import init_visual_from_eva_clip
    eva, model = _eva(img_size=24), _qlip()
    report = init_visual_from_eva_clip(model, eva)
    assert report["pos_embed"] == "resampled 3x3 -> 4x4 (bicubic)"
    assert torch.equal(model.visual.pos_embed[0], eva.pos_embed[0, 0])  # cls row kept
    eva.set_input_size(img_size=(32, 32))
    _assert_same_tower(model, eva, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)))


def test_projection_without_a_match_is_left_as_is():
    from qlip.io.init_weights import init_visual_from_eva_clip
    for num_classes, note in ((0, "the source has no projection"), (48, "projects 64 -> 48, the model 64 -> 32")):
        model = _qlip()
        before = model.visual.proj.weight.clone()
        report = init_visual_from_eva_clip(model, _eva(num_classes=num_classes))
        assert report["proj"] == "left as is" and any(note in n for n in report["notes"]), report
        assert torch.equal(model.visual.proj.weight, before)
    model = _qlip(**{"vision.projection_bias": False})
    with pytest.raises(ConfigError, match="vision.projection_bias: EVA True vs model False"):
        init_visual_from_eva_clip(model, _eva())


def test_mismatches_are_named_in_one_error():
    from qlip.io.init_weights import init_visual_from_eva_clip
    from timm.layers import LayerNorm
    from functools import partial
    eva = _eva(embed_dim=96, depth=3, num_heads=6, mlp_ratio=2.0, patch_size=4, swiglu_mlp=False,
               scale_attn_inner=False, use_rot_pos_emb=False, init_values=0.1, qk_norm=True, global_pool="avg",
               use_fc_norm=False, norm_layer=partial(LayerNorm, eps=1e-5))
    with pytest.raises(ConfigError) as e:
        init_visual_from_eva_clip(_qlip(), eva)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("vision.width: EVA 96 vs model 64", "vision.depth: EVA 3 vs model 2",
                 "vision.heads: EVA 6 vs model 4", "vision.mlp_dim: EVA 192 vs model 160",
                 "vision.patch_size: EVA 4 vs model 8", "vision.swiglu: EVA False vs model True",
                 "vision.subln (attention inner norm, scale_attn_inner): EVA False vs model True",
                 "vision.rope: EVA False vs model True", "layer scale", "qk_norm", "global pool 'avg'",
                 "vision.ln_eps: EVA 1e-05 vs model 1e-06"):
        assert part in msg, part


def test_unsupported_rope_and_bias_layouts_are_named():
    from qlip.io.init_weights import init_visual_from_eva_clip
    eva = _eva(rope_rotate_half=True, rope_grid_indexing="xy", ref_feat_shape=(8, 8), rope_temperature=100.0)
    with pytest.raises(ConfigError) as e:
        init_visual_from_eva_clip(_qlip(**{"vision.q_bias": False, "vision.v_bias": False}), eva)
    msg = str(e.value)
    for part in ("rope rotate_half", "rope grid_indexing 'xy'", "rope reference grid 8x8 vs model 16x16",
                 "rope temperature 100.0 vs model 10000", "vision.q_bias: EVA has a q bias, model has none",
                 "vision.v_bias: EVA has a v bias, model has none"):
        assert part in msg, part
    # no reference grid: raw token indices, the same as qlip's only on a 16x16 grid
    with pytest.raises(ConfigError, match="rope reference grid 4x4 vs model 16x16"):
        init_visual_from_eva_clip(_qlip(), _eva(ref_feat_shape=None))
    # a model with a k bias gets zeros (EVA-02 has none)
    model = _qlip(**{"vision.k_bias": True})
    init_visual_from_eva_clip(model, _eva())
    assert float(model.visual.transformer.blocks[0].attn.k_bias.detach().abs().max()) == 0.0


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """A registered timm model (TIMM_NAME) and open_clip config (OC_ARCH) with the EVA_TINY tower."""
    from timm.models import build_model_with_cfg, register_model
    if not timm.is_model(TIMM_NAME):
        def qlip_test_eva02_tiny_clip(pretrained=False, **kwargs):
            args = {**EVA_TINY, "global_pool": kwargs.pop("global_pool", "token"),
                    "num_classes": kwargs.pop("num_classes", 32)}
            return build_model_with_cfg(Eva, TIMM_NAME, pretrained, **args, **kwargs)
        register_model(qlip_test_eva02_tiny_clip)
    d = tmp_path_factory.mktemp("open_clip_eva_cfg")
    (d / f"{OC_ARCH}.json").write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(str(d))
    return d


def test_open_clip_and_timm_sources(tiny_sources, tmp_path):
    from safetensors.torch import save_file
    from qlip.io.init_weights import init_visual_from_eva_clip
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # an open_clip model (timm_proj null: the projection is the trunk's head), as a module
    torch.manual_seed(0)
    oc = open_clip.create_model(OC_ARCH).eval()
    trunk = oc.visual.trunk
    trunk.load_state_dict(_eva().state_dict())
    model = _qlip()
    init_visual_from_eva_clip(model, oc)
    with torch.no_grad():
        assert _max_diff(oc.encode_image(x), model.encode_image(x)) <= 1e-5
    # timm_proj linear (no bias): the projection lives in visual.head.proj, our bias becomes zero
    cfg = json.loads(json.dumps(OC_CFG))
    cfg["vision_cfg"].update(timm_proj="linear", timm_proj_bias=False)
    (tiny_sources / f"{OC_ARCH}-linear.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tiny_sources))
    oc = open_clip.create_model(f"{OC_ARCH}-linear").eval()
    oc.visual.trunk.load_state_dict(_eva(num_classes=0).state_dict())
    with torch.no_grad():
        oc.visual.head.proj.weight.normal_()
    model = _qlip()
    assert init_visual_from_eva_clip(model, oc.visual)["proj"] == "copied"
    assert float(model.visual.proj.bias.detach().abs().max()) == 0.0
    with torch.no_grad():
        assert _max_diff(oc.encode_image(x), model.encode_image(x)) <= 1e-5
    # "timm:NAME:FILE": timm weights from a local file
    save_file({k: v.contiguous() for k, v in trunk.state_dict().items()}, str(tmp_path / "eva.safetensors"))
    model = _qlip()
    report = init_visual_from_eva_clip(model, f"timm:{TIMM_NAME}:{tmp_path / 'eva.safetensors'}")
    assert report["source"].startswith("timm:") and report["proj"] == "copied"
    _assert_same_tower(model, trunk, x)


def test_bad_specs(tiny_sources):
    from qlip.io.init_weights import init_visual_from_eva_clip
    model = _qlip()
    with pytest.raises(ConfigError, match="model.init_eva_clip is empty"):
        init_visual_from_eva_clip(model, " ")
    with pytest.raises(ConfigError, match="timm has no model 'nope_eva'"):
        init_visual_from_eva_clip(model, "timm:nope_eva")
    with pytest.raises(ConfigError, match="no pretrained weights 'eva02_base_patch16_clip_224.nope'"):
        init_visual_from_eva_clip(model, "timm:eva02_base_patch16_clip_224.nope")
    with pytest.raises(ConfigError, match="open_clip has no model 'EVA-Nope'"):
        init_visual_from_eva_clip(model, "EVA-Nope:merged2b")
    with pytest.raises(CheckpointError, match="no weights file"):
        init_visual_from_eva_clip(model, f"timm:{TIMM_NAME}:/nonexistent/eva.safetensors")
    tiny_vit = open_clip.model.CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": 1, "width": 64,
                                                              "patch_size": 8, "head_width": 16},
                                    text_cfg={"width": 48, "heads": 4, "layers": 1})
    with pytest.raises(ConfigError, match="the vision tower is VisionTransformer, not a timm EVA"):
        init_visual_from_eva_clip(model, tiny_vit)
    try:
        conv_stem = _qlip(**{"vision.stem": "conv"})
    except ConfigError:
        return  # a qlip without the vision.stem option
    with pytest.raises(ConfigError, match="vision.stem: EVA patch vs model conv"):
        init_visual_from_eva_clip(conv_stem, _eva())


@pytest.mark.parametrize("spec", ["EVA02-B-16:merged2b_s8b_b131k", "timm:eva02_base_patch16_clip_224.merged2b"])
def test_offline_pretrained_spec_is_one_line_checkpoint_error(spec, monkeypatch):
    from qlip.io.init_weights import init_visual_from_eva_clip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(CheckpointError) as e:
        init_visual_from_eva_clip(_qlip(), spec)
    msg = str(e.value)
    assert spec in msg and "\n" not in msg and "Hugging Face cache" in msg
    assert time.monotonic() - t0 < 120


def test_recipe_init_eva_clip_end_to_end(tiny_sources, tmp_path):
    """model.init_eva_clip with open_clip weights in a local folder; one training step with the
    vision encoder frozen (lr_visual 0) keeps exactly the EVA weights in the saved model."""
    from safetensors.torch import save_file
    from _train_testutils import ListLoader, tiny_recipe, weights
    from qlip.train.recipe import Recipe
    from qlip.train import train
    from qlip.train.tasks.qlip import build_model
    torch.manual_seed(0)
    oc = open_clip.create_model(OC_ARCH)
    oc.visual.trunk.load_state_dict(_eva().state_dict())
    folder = tmp_path / "eva_clip"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": OC_CFG}))
    spec = f"local-dir:{folder}"

    model = build_model(Recipe.from_dict({"model": {"preset": "qlip-tiny", "init_eva_clip": spec}}))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _max_diff(oc.eval().encode_image(x), model.encode_image(x)) <= 1e-5

    d = tiny_recipe(tmp_path / "no-shards", model={"preset": "qlip-tiny", "init_eva_clip": spec},
                    optim={"steps": 1, "warmup_steps": 0, "lr_visual": 0.0}, train={"ckpt_every": 0})
    batch = {"images": torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5)),
             "tokens": open_clip.tokenize(["a red circle", "two blue stars", "a green square", "a cat"])}
    summary = train(Recipe.from_dict(d), str(tmp_path / "run"), loader=ListLoader([batch]))
    assert summary["steps"] == 1
    saved = weights(tmp_path / "run" / "final")
    for k, v in model.visual.state_dict().items():
        assert torch.equal(saved["visual." + k], v), k
