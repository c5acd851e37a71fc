"""Fixed normalisation of the vision features (qlip.vlm.feature_norm): what each kind computes,
that standardize's statistics are measured by the training task on a fresh model, saved with
the model and restored by load (a reloaded model answers identically), and the projector's lr."""
import pytest
import torch
import yaml

import qlip.vlm  # noqa: F401  (registers task "vlm")
from qlip.errors import ConfigError
from qlip.vlm.feature_norm import FeatureNorm


def test_each_kind_computes_what_it_says():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 6) * torch.tensor([0.01, 0.1, 1.0, 2.0, 0.05, 3.0]) + torch.arange(6.0)
    assert torch.equal(FeatureNorm("none", 6)(x), x) and not list(FeatureNorm("none", 6).state_dict())
    ln = FeatureNorm("layernorm", 6)(x)
    assert torch.allclose(ln.mean(-1), torch.zeros(5, 7), atol=1e-5)
    assert torch.allclose(ln.var(-1, unbiased=False), torch.ones(5, 7), atol=1e-3)
    assert not list(FeatureNorm("layernorm", 6).state_dict())
    st = FeatureNorm("standardize", 6)
    assert torch.equal(st(x), x)  # unfitted: mean 0, std 1
    st.fit(x)
    y = st(x).reshape(-1, 6)
    assert torch.allclose(y.mean(0), torch.zeros(6), atol=1e-5) and torch.allclose(y.std(0), torch.ones(6), atol=1e-5)
    assert torch.allclose(st.mean, x.reshape(-1, 6).mean(0)) and set(st.state_dict()) == {"mean", "std"}
    with pytest.raises(ConfigError, match="feature_norm must be one of"):
        FeatureNorm("batchnorm", 6)
    with pytest.raises(ConfigError, match="at least two"):
        FeatureNorm("standardize", 6).fit(torch.ones(1, 6))


def _recipe(tmp_path, qlip_dir, llm_dir, qa_dir, **train):
    d = {"task": "vlm",
         "model": {"qlip": str(qlip_dir), "llm": str(llm_dir), "max_length": 64, "feature_norm": "standardize",
                   "feature_norm_images": 8},
         "data": {"train": str(qa_dir / "train.json"), "batch_size": 2},
         "optim": {"optimizer": "adamw", "lr": 1e-3, "warmup_steps": 1, "steps": 2, "weight_decay": 0.0},
         "train": {"stage": 1, "log_every": 1, "ckpt_every": 0, "progress": False, "tensorboard": False, **train}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(path)


def test_standardize_is_measured_on_training_images_saved_and_reloaded(tmp_path, qlip_dir, llm_dir, qa_dir):
    from qlip.train import load_recipe, train
    from qlip.vlm import generate, load
    from qlip.vlm.data import VLMProcessor, read_llava_json
    out = tmp_path / "run"
    summary = train(load_recipe(_recipe(tmp_path, qlip_dir, llm_dir, qa_dir)), str(out))
    m = load(summary["final_model"])
    assert m.config.feature_norm == "standardize"
    # the statistics of the first 8 distinct training images' layer -2 features, fixed during training
    images = list(dict.fromkeys(r["image"] for r in read_llava_json(str(qa_dir / "train.json")) if r.get("image")))[:8]
    assert len(images) == 8
    proc = VLMProcessor(m)
    feats = m.vision(torch.stack([proc.image(str(qa_dir / im)) for im in images])).reshape(-1, m.vision.width)
    assert torch.allclose(m.feature_norm.mean, feats.mean(0), atol=1e-6)
    assert torch.allclose(m.feature_norm.std, feats.std(0), atol=1e-6)
    assert not any(k.startswith("vision") for k in m.state_dict())
    # a save / load round trip keeps the statistics and the answers
    m.save_pretrained(str(tmp_path / "copy"))
    back = load(str(tmp_path / "copy"))
    assert torch.equal(back.feature_norm.mean, m.feature_norm.mean)
    assert torch.equal(back.feature_norm.std, m.feature_norm.std)
    img = str(qa_dir / images[0])
    torch.manual_seed(0)
    a = generate(m, [img], ["What color is the shape?"], max_new_tokens=3)
    b = generate(back, [img], ["What color is the shape?"], max_new_tokens=3)
    assert a == b
    x = proc.image(img)[None]
    assert torch.equal(m.image_features(x), back.image_features(x))


def test_projector_lr_is_its_own_param_group(tmp_path, qlip_dir, llm_dir, qa_dir):
    from qlip.train import load_recipe
    from qlip.vlm.task import VLMTask
    r = load_recipe(_recipe(tmp_path, qlip_dir, llm_dir, qa_dir, stage=2, projector_lr=5e-3))
    r.model.feature_norm = "none"
    task = VLMTask.__new__(VLMTask)
    task.r = r
    model = task.build_model()
    lrs = {g["name"]: g["lr"] for g in task.param_groups(model)}
    assert lrs["projector"] == 5e-3 and lrs["llm"] == 1e-3 and lrs["llm_nd"] == 1e-3
    assert all(n.startswith("projector.") for g in task.param_groups(model) if g["name"].startswith("projector")
               for n in g["names"])
    with pytest.raises(ConfigError, match="projector_lr"):
        load_recipe(_recipe(tmp_path, qlip_dir, llm_dir, qa_dir, projector_lr=0.0))
