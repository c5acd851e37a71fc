"""model.init_open_clip: open_clip text towers copied into model.text (offline, tiny random models)."""
import json

import pytest
import torch

from qlip.errors import CheckpointError, ConfigError

open_clip = pytest.importorskip("open_clip")

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2,
                     "mlp_ratio": 2.0}}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory):
    """Register open_clip configs matching (and not matching) qlip-tiny's text tower."""
    d = tmp_path_factory.mktemp("open_clip_cfg")
    (d / "qlip-test-oc-tiny.json").write_text(json.dumps(TINY))
    bad = json.loads(json.dumps(TINY))
    bad["text_cfg"].update(width=64, layers=3)
    bad["quick_gelu"] = True
    (d / "qlip-test-oc-bad.json").write_text(json.dumps(bad))
    open_clip.add_model_config(str(d))
    return "qlip-test-oc-tiny"


def _tiny():
    import qlip
    torch.manual_seed(0)
    return qlip.load("qlip-tiny", pretrained=False)


def _close_embeddings(model, oc):
    tokens = open_clip.tokenize(["a large red circle on the left", "two blue stars", "", "a " * 90])
    with torch.no_grad():
        ours = model.encode_text(tokens, normalize=True)
        theirs = oc.encode_text(tokens, normalize=True)
    assert float((ours - theirs).abs().max()) <= 1e-5
    assert model.logit_scale.item() == pytest.approx(oc.logit_scale.item())


def test_text_tower_from_open_clip_random_init(tiny_arch):
    from qlip.io.init_weights import init_text_from_open_clip
    model = _tiny()
    before = model.text.token_embed.weight.clone()
    oc = init_text_from_open_clip(model, tiny_arch)
    assert not torch.equal(before, model.text.token_embed.weight)
    _close_embeddings(model, oc)


def test_text_tower_from_open_clip_weights_in_a_local_folder(tiny_arch, tmp_path):
    """"local-dir:" loads open_clip weights from disk: the pretrained path, offline."""
    from safetensors.torch import save_file
    from qlip.io.init_weights import init_text_from_open_clip
    torch.manual_seed(1)
    src = open_clip.create_model(tiny_arch)
    with torch.no_grad():
        src.logit_scale.fill_(3.5)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "open_clip_model.safetensors"))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY}))
    model = _tiny()
    oc = init_text_from_open_clip(model, f"local-dir:{tmp_path}")
    assert model.logit_scale.item() == pytest.approx(3.5)
    _close_embeddings(model, src)
    _close_embeddings(model, oc)


def test_mismatches_are_named_in_one_line(tiny_arch):
    from qlip.io.init_weights import init_text_from_open_clip
    with pytest.raises(ConfigError) as e:
        init_text_from_open_clip(_tiny(), "qlip-test-oc-bad")
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("text.width: open_clip 64 vs model 48", "text.depth: open_clip 3 vs model 2",
                 "text.act: open_clip quick_gelu vs model gelu"):
        assert part in msg
    import qlip
    no_text = qlip.load("qlip-tiny", pretrained=False)
    no_text.drop_text()
    with pytest.raises(ConfigError, match="no text tower"):
        init_text_from_open_clip(no_text, tiny_arch)
    with pytest.raises(ConfigError, match="no model 'ViT-Nope'"):
        init_text_from_open_clip(_tiny(), "ViT-Nope:openai")
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'"):
        init_text_from_open_clip(_tiny(), "ViT-B-32:nope")


def test_offline_download_failure_is_one_line(monkeypatch):
    from qlip.io.init_weights import init_text_from_open_clip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        init_text_from_open_clip(_tiny(), "ViT-B-32:openai")
    assert "ViT-B-32:openai" in str(e.value) and "\n" not in str(e.value)


def test_recipe_init_open_clip(tiny_arch):
    from qlip.train.recipe import Recipe
    from qlip.train.tasks.qlip import build_model
    torch.manual_seed(0)
    model = build_model(Recipe.from_dict({"model": {"preset": "qlip-tiny", "init_open_clip": tiny_arch}}))
    torch.manual_seed(0)
    plain = build_model(Recipe.from_dict({"model": {"preset": "qlip-tiny"}}))
    assert torch.equal(model.visual.proj.weight, plain.visual.proj.weight)  # only the text tower changes
    assert not torch.equal(model.text.token_embed.weight, plain.text.token_embed.weight)
