import json

import numpy as np
import pytest
import torch
from PIL import Image

import qlip
from qlip.errors import CheckpointError, ConfigError, DataError, QLIPError


def test_tokenize_detokenize_reconstruct(tiny_model):
    m = tiny_model
    x = torch.randn(3, 3, 32, 32)
    ids = m.tokenize(x)
    assert ids.shape == (3, 4, 4) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 2 ** 28
    y = m.detokenize(ids)
    assert y.shape == x.shape
    torch.testing.assert_close(m.reconstruct(x), y, rtol=1e-5, atol=1e-5)
    out = m(x)  # training forward agrees with the inference path
    assert torch.equal(out.ids, ids)
    torch.testing.assert_close(out.recon, y, rtol=1e-5, atol=1e-5)


def test_training_forward_gradients(tiny_model):
    m = tiny_model.train()
    x = torch.randn(4, 3, 32, 32)
    t = m.tokenizer(["a red circle", "a blue square", "a star", "two shapes"])
    out = m(x, t)
    assert out.text_embeds.shape == (4, 32) and out.image_embeds.shape == (4, 32)
    assert out.quant_loss.requires_grad and set(out.quant_stats) == {"persample_entropy", "codebook_entropy", "commit"}
    loss = ((out.recon - x) ** 2).mean() + out.quant_loss + out.logit_scale * (out.image_embeds @ out.text_embeds.T).sum()
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None]
    assert not no_grad, no_grad


def test_preprocess_modes_and_postprocess(tiny_model):
    m = tiny_model
    rgb = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 60, 3), dtype=np.uint8))
    imgs = [rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("CMYK"), rgb.convert("P"),
            Image.fromarray((np.random.RandomState(1).rand(50, 50) * 65535).astype(np.uint16))]
    x = m.preprocess(imgs)
    assert x.shape == (6, 3, 32, 32)
    # a fully transparent RGBA image composites to white
    clear = Image.new("RGBA", (32, 32), (10, 20, 30, 0))
    white = m.postprocess(m.preprocess([clear]))[0]
    assert np.asarray(white).min() == 255
    # 16-bit greyscale maps to the full 8-bit range, not clipped to white
    grey16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    back = np.asarray(m.postprocess(m.preprocess([grey16]))[0])
    assert abs(int(back.mean()) - 128) <= 1
    # postprocess inverts preprocess up to rounding
    pil = m.postprocess(m.preprocess([rgb]))[0]
    assert pil.size == (32, 32) and pil.mode == "RGB"


def test_text_and_zero_shot(tiny_model):
    m = tiny_model
    t = m.tokenizer(["a photo of a dog", "a cat"])
    assert t.shape == (2, 77) and t.dtype == torch.int64
    assert t[0, 0] == 49406 and (t[0] == 49407).sum() == 1
    # captions' ids are remembered: repeats, duplicates and a full memo give the ids of a plain encoding
    tok, texts = m.tokenizer, ["a cat", "a photo of a dog", "a cat", "a bird"]
    assert torch.equal(tok(texts), tok._encode(texts)) and torch.equal(tok(texts), tok._encode(texts))
    assert torch.equal(tok(texts)[1], t[0]) and tok(texts).data_ptr() != tok(texts).data_ptr()
    from qlip.text import Tokenizer
    full = Tokenizer(77)
    full.MEMO_SIZE = 1
    assert torch.equal(full(texts), tok._encode(texts)) and full._memo == {}
    assert tok([]).shape == (0, 77)
    x = torch.randn(2, 3, 32, 32)
    probs = m.zero_shot(x, ["a dog", "a cat", "a bird"])
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    img = m.encode_image(x, normalize=True)
    txt = m.encode_text(m.tokenizer(["a dog", "a cat", "a bird"]), normalize=True)
    torch.testing.assert_close(probs, (m.logit_scale.exp() * img @ txt.T).softmax(-1))
    m.drop_text()
    with pytest.raises(QLIPError, match="no text tower"):
        m.zero_shot(x, ["a", "b"])


def test_encode_image_features(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    f = tiny_model.encode_image_features(x, layer=-2)
    assert f.shape == (2, 16, 64)
    last = tiny_model.encode_image_features(x, layer=-1, include_cls=True)
    torch.testing.assert_close(last, tiny_model.visual(x))
    # numbered like transformers' hidden_states (LLaVA's select_layer): 0 = embeddings, k = block k
    depth = tiny_model.config.vision.depth
    _, blocks = tiny_model.visual(x, return_layers=True)
    torch.testing.assert_close(tiny_model.encode_image_features(x, layer=0, include_cls=True),
                               tiny_model.visual.embed(x))
    torch.testing.assert_close(tiny_model.encode_image_features(x, layer=-(depth + 1)), tiny_model.visual.embed(x)[:, 1:])
    torch.testing.assert_close(tiny_model.encode_image_features(x, layer=1), blocks[0][:, 1:])
    torch.testing.assert_close(f, blocks[-2][:, 1:] if depth >= 2 else tiny_model.visual.embed(x)[:, 1:])
    with pytest.raises(QLIPError, match=f"has {depth + 1} hidden states"):
        tiny_model.encode_image_features(x, layer=depth + 1)
    one = qlip.QLIP(qlip.get_preset("qlip-tiny", **{"vision.depth": 1})).eval()
    torch.testing.assert_close(one.encode_image_features(x, layer=-2), one.visual.embed(x)[:, 1:])  # LLaVA's -2


def test_save_pretrained_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["format"] == "qlip"
    back = qlip.load(str(tmp_path / "m"))
    assert back.config == tiny_model.config
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list((tmp_path / "m").glob("*.tmp")), "temporary files left behind"


def test_detokenize_rejects_bad_ids(tiny_model):
    with pytest.raises(DataError, match="shape"):
        tiny_model.detokenize(torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(DataError, match=r"2\*\*28"):
        tiny_model.detokenize(torch.full((1, 4, 4), 2 ** 28))
    with pytest.raises(DataError, match="integer"):
        tiny_model.detokenize(torch.zeros(1, 4, 4))


def _corrupt(tmp_path, tiny_model, edit):
    from safetensors.torch import load_file, save_file
    tiny_model.save_pretrained(tmp_path / "m")
    sd = load_file(tmp_path / "m" / "model.safetensors")
    edit(sd)
    save_file(sd, tmp_path / "m" / "model.safetensors")
    return str(tmp_path / "m")


def test_checkpoint_key_errors_name_the_keys(tiny_model, tmp_path):
    path = _corrupt(tmp_path, tiny_model, lambda sd: sd.pop("decoder.norm.weight"))
    with pytest.raises(CheckpointError, match="missing keys: decoder.norm.weight"):
        qlip.load(path)
    path = _corrupt(tmp_path, tiny_model, lambda sd: sd.update(extra_thing=torch.zeros(1)))
    with pytest.raises(CheckpointError, match="unexpected keys: extra_thing"):
        qlip.load(path)
    path = _corrupt(tmp_path, tiny_model, lambda sd: sd.update({"visual.ln_post.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"visual.ln_post.weight \(3,\)"):
        qlip.load(path)


def test_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="unknown keys in config section 'vision': widht"):
        qlip.QLIPConfig.from_dict({"vision": {"widht": 3}})
    with pytest.raises(ConfigError, match="not divisible"):
        qlip.get_preset("qlip-tiny", **{"vision.heads": 5})
    with pytest.raises(ConfigError, match="unknown preset"):
        qlip.get_preset("qlip-huge")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text(json.dumps({"format": "qlip", "config": {"vision": {"patch_size": 7}}}))
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "c" / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot build a model"):
        qlip.load(str(tmp_path / "c"))


def test_hub_offline_error_names_the_download(monkeypatch):
    """Offline, a hub id fails with one line naming how to get the files (issue 10: no longer the
    cache folder to fill by hand; tests/test_cli.py checks the command works)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        qlip.load("nvidia/QLIP-B-16-256")
    msg = str(e.value)
    assert "download nvidia/QLIP-B-16-256" in msg and "\n" not in msg
    with pytest.raises(CheckpointError, match="not a folder, a hub id or a preset"):
        qlip.load("no-such-thing")


def test_bf16_autocast_tokenize(tiny_model):
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids = tiny_model.tokenize(x)
        y = tiny_model.detokenize(ids)
    assert ids.dtype == torch.int64 and y.shape == x.shape
    bits = tiny_model.quantizer.ids_to_bits
    agree = (bits(ids) == bits(tiny_model.tokenize(x))).float().mean()
    assert agree > 0.98  # 0.997 measured (stop 17)


def test_conv_stem(tmp_path):
    """vision.stem='conv': same token grid as the patchify stem, each token sees only its own patch,
    the init keeps the activation scale, it round-trips through our format, and the official
    format (patchify only) refuses it by name."""
    torch.manual_seed(0)
    cfg = qlip.get_preset("qlip-tiny", **{"vision.stem": "conv", "vision.stem_channels": 8})
    model = qlip.QLIP(cfg).eval()
    stem = model.visual.patch_embed
    assert [m.stride for m in stem.convs if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3  # patch 8
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = stem(x)
        assert feats.shape == (2, cfg.vision.width, 4, 4)
        assert 0.05 < feats.std().item() < 5.0  # Kaiming init, not the ViT std 0.02 that vanishes
        # receptive field of token k: pixels 8k-7 .. 8k+7, so a change in patch (1, 1) (pixels
        # 8..15) reaches tokens 1 and 2 of each axis, never tokens 0 and 3
        y = x.clone()
        y[:, :, 8:16, 8:16] += 1.0
        delta = (stem(y) - feats).abs().amax(dim=(0, 1))
        assert (delta[1:3, 1:3] > 0).all()
        assert delta[[0, 3]].abs().max() == 0 and delta[:, [0, 3]].abs().max() == 0
        ids = model.tokenize(x)
    assert ids.shape == (2, 4, 4)
    model.save_pretrained(tmp_path / "m")
    back = qlip.load(str(tmp_path / "m"))
    assert back.config.vision.stem == "conv"
    assert torch.equal(back.tokenize(x), ids)
    with pytest.raises(ConfigError, match="vision.stem 'conv'"):
        qlip.export_official(model, tmp_path / "official")
    with pytest.raises(ConfigError, match="power-of-two patch_size"):
        qlip.get_preset("qlip-tiny", **{"vision.stem": "conv", "vision.patch_size": 6, "vision.image_size": 36})
    with pytest.raises(ConfigError, match="stem must be 'patch' or 'conv'"):
        qlip.get_preset("qlip-tiny", **{"vision.stem": "hybrid"})


def test_conv_pixel_head(tmp_path):
    """decoder.head='conv': (B, 3, H, W) pixels from the token grid; a token reaches only the pixels
    of its own patch and a few neighbouring ones (3x3 convolutions after each 2x upsampling), unlike
    the linear head's exactly-one-patch; it round-trips through our format and the official format
    (linear head only) refuses it by name."""
    torch.manual_seed(0)
    cfg = qlip.get_preset("qlip-tiny", **{"decoder.head": "conv", "decoder.head_channels": 4})
    model = qlip.QLIP(cfg).eval()
    model.init_weights()
    head = model.decoder.conv_head
    assert not hasattr(model.decoder, "head_out")
    assert [m.out_channels for m in head.modules() if isinstance(m, torch.nn.Conv2d)] == [32, 16, 8, 4, 3]  # patch 8: 4 * 2^3, halving
    g, D = cfg.grid, cfg.decoder.width
    h = torch.randn(2, g * g, D)
    with torch.no_grad():
        out = head(h)
        assert out.shape == (2, 3, 32, 32)
        h2 = h.clone()
        h2[:, 0] += 1.0  # token (0, 0): pixels 0..7 of each axis, plus the convolutions' reach
        delta = (head(h2) - out).abs().amax(dim=(0, 1))
    assert (delta[:8, :8] > 0).all()
    assert delta[16:].max() == 0 and delta[:, 16:].max() == 0  # reach: 1 + 2 + 4 + 1 pixels past the patch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ids = model.tokenize(x)
        rec = model.detokenize(ids)
    assert rec.shape == (2, 3, 32, 32)
    model.save_pretrained(tmp_path / "m")
    back = qlip.load(str(tmp_path / "m"))
    assert back.config.decoder.head == "conv"
    with torch.no_grad():
        assert torch.equal(back.detokenize(ids), rec)
    with pytest.raises(ConfigError, match="decoder.head 'conv'"):
        qlip.export_official(model, tmp_path / "official")
    with pytest.raises(ConfigError, match="decoder head must be 'linear' or 'conv'"):
        qlip.get_preset("qlip-tiny", **{"decoder.head": "deconv"})
    # stage 2's head swap (model.decoder_head): every weight but the pixel head is kept
    lin = qlip.QLIP(qlip.get_preset("qlip-tiny")).eval()
    swapped = lin.with_decoder_head("conv", 4)
    assert swapped.config.decoder.head == "conv" and lin.config.decoder.head == "linear"
    a, b = lin.state_dict(), swapped.state_dict()
    kept = [k for k in a if not k.startswith("decoder.head_")]
    assert kept and all(torch.equal(a[k], b[k]) for k in kept)
    assert {k for k in b if k not in a} == {k for k in b if k.startswith("decoder.conv_head.")}
    with torch.no_grad():
        assert torch.equal(swapped.tokenize(x), lin.tokenize(x))
