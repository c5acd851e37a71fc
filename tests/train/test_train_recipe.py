"""Recipe validation: unknown keys, bad values, key=value overrides, YAML 1.1 number strings."""
import pytest
import yaml

from qlip.errors import ConfigError
from qlip.train.recipe import Recipe, apply_overrides, list_fields, load_recipe, parse_override, recipe_to_yaml


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


def test_yaml_number_strings_are_coerced(tmp_path):
    # PyYAML (YAML 1.1) reads 2e-3 and 1e3 as strings
    r = load_recipe(_write(tmp_path, "optim: {lr: 2e-3, steps: 1e3, betas: [0.9, 0.98]}\nloss: {alpha_r: 1e3}\n"))
    assert r.optim.lr == 0.002 and isinstance(r.optim.lr, float)
    assert r.optim.steps == 1000 and isinstance(r.optim.steps, int)
    assert r.optim.betas == (0.9, 0.98) and r.loss.alpha_r == 1000.0


def test_overrides(tmp_path):
    path = _write(tmp_path, "model: {preset: qlip-tiny, overrides: {vision: {depth: 1}}}\noptim: {lr: 2e-3}\n")
    r = load_recipe(path, ["optim.lr=1e-3", "model.overrides.vision.depth=3", "train.precision=bf16",
                           "optim.betas=[0.8, 0.9]", "train.progress=false", "data.train=a-{0..3}.tar"])
    assert r.optim.lr == 1e-3
    assert r.model.overrides == {"vision.depth": 3}  # nested YAML mapping flattened, then overridden
    assert r.train.precision == "bf16" and r.optim.betas == (0.8, 0.9) and r.train.progress is False
    assert r.data.train == "a-{0..3}.tar"
    assert parse_override("optim.lr=1e-3") == ("optim.lr", 0.001)
    assert parse_override("model.init=") == ("model.init", None)
    # a nested mapping must not replace a whole config section of the preset
    from qlip.model import get_preset
    cfg = get_preset("qlip-tiny", **r.model.overrides)
    assert cfg.vision.depth == 3 and cfg.vision.image_size == 32
    # the recipe round-trips through YAML
    again = Recipe.from_dict(yaml.safe_load(recipe_to_yaml(r)))
    assert again == r


@pytest.mark.parametrize("text, overrides, match", [
    ("optim: {lrr: 1}\n", [], "unknown keys in recipe section 'optim': lrr"),
    ("optimizer: {lr: 1}\n", [], "unknown recipe sections: optimizer"),
    ("", ["optim.lrr=1"], "lrr"),
    ("", ["lr=1"], "section and a key"),
    ("", ["optim.lr"], "section.key=value"),
    ("", ["optim.lr.x=1"], "two levels"),
    ("", ["optim.lr=fast"], "optim.lr: cannot read 'fast'"),
    ("", ["optim.lr=-1"], "optim.lr must be >= 0"),
    ("", ["optim.lr=true"], "optim.lr must be a number"),
    ("", ["optim.lr=nan"], "optim.lr must be >= 0"),
    ("", ["optim.lr_visual=-1"], "optim.lr_visual must be >= 0"),
    ("", ["optim.steps=1.5"], "optim.steps must be an integer"),
    ("", ["optim.steps=0"], ">= 1"),
    ("", ["data.cache_mb=-1"], "data.cache_mb"),
    ("", ["optim.betas=[0.9]"], "optim.betas must be two values"),
    ("", ["optim.betas=0.9"], "optim.betas must be a list"),
    ("", ["optim.optimizer=sgd"], "lamb or adamw"),
    ("", ["optim.schedule=linear"], "cosine or constant"),
    ("", ["optim.min_lr_ratio=2"], "min_lr_ratio"),
    ("", ["train.stage=3"], "train.stage"),
    ("", ["train.precision=fp16"], "fp32, bf16 or auto"),
    ("", ["train.progress=maybe"], "true or false"),
    ("", ["train.log_every=0"], "train.log_every"),
    ("", ["train.contrastive_chunk=-1"], "contrastive_chunk"),
    ("", ["train.stage=2"], "alpha_a to 0"),
    ("", ["loss.alpha_r=-1"], "loss.alpha_r must be >= 0"),
    ("", ["loss.alpha_s=0.1"], "stage-2 term"),
    ("", ["loss.alpha_s=-1"], "loss.alpha_s must be >= 0"),
    ("", ["loss.semantic_features=pixels"], "embedding or tokens"),
    ("", ["train.fsdp=true", "optim.optimizer=lamb"], "train.fsdp needs optim.optimizer=adamw"),
    ("", ["loss.alpha_r=0", "loss.alpha_q=0", "loss.alpha_a=0"], "nothing to train"),
    ("", ["train.contrastive_chunk=4", "loss.alpha_p=0.1"], "gradient caching"),
    ("", ["gan.kind=wgan"], "hinge or non_saturating"),
    ("", ["gan.r1_every=0"], "gan.r1_every"),
    ("", ["model.overrides=3"], "model.overrides must be a mapping"),
    ("", ["model.preset=3"], "model.preset must be a string"),
    ("optim: [1, 2]\n", [], "section 'optim' must be a mapping"),
    ("optim: {lr: [1\n", [], "invalid YAML"),
])
def test_bad_recipes_fail_with_one_line(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace("(", r"\(")) as e:
        load_recipe(_write(tmp_path, text), overrides)
    assert "\n" not in str(e.value)


def test_missing_file_and_fields():
    with pytest.raises(ConfigError, match="no such recipe file"):
        load_recipe("/nonexistent/recipe.yaml")
    fields = list_fields()
    assert "optim.lr" in fields and "data.global_batches" in fields and "train.contrastive_chunk" in fields


def test_empty_sections_and_overrides_on_empty_model():
    d = apply_overrides({"model": None, "optim": None}, ["model.overrides.vision.depth=3", "optim.lr=1e-3"])
    r = Recipe.from_dict(d)
    assert r.model.overrides == {"vision.depth": 3} and r.optim.lr == 1e-3


def test_unknown_model_override_fails_when_the_model_is_built(shapes_dir, tmp_path):
    from qlip.train.tasks.qlip import build_model
    r = Recipe.from_dict({"model": {"preset": "qlip-tiny", "overrides": {"vision.dpth": 3}}})
    with pytest.raises(ConfigError, match="vision.dpth"):
        build_model(r)


def test_cli_reports_recipe_errors_in_one_line(tmp_path, capsys):
    from qlip.cli import main
    path = _write(tmp_path, "model: {preset: qlip-tiny}\n")
    assert main(["train", path, "optim.lrr=1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qlip: error:") and "lrr" in err and "\n" not in err
    assert main(["train", path, "--out", str(tmp_path / "o")]) == 2  # no data.train
    assert "data.train is empty" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["shards", "csv"])
def test_data_cache_mb_reaches_the_loader(tmp_path, source):
    """data.cache_mb is the loader's for tar shards and for a CSV of image paths alike."""
    from PIL import Image

    from qlip.data.shapes import generate_shapes
    from qlip.train.distributed import DistInfo
    from qlip.train.tasks import get_task
    if source == "shards":
        generate_shapes(str(tmp_path), n=4, size=32, seed=0, shard_size=4, heldout_n=0, progress=False)
        train = str(tmp_path / "shapes-train-*.tar")
    else:
        Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "a.png")
        (tmp_path / "pairs.csv").write_text("filepath,title\na.png,a red square\n")
        train = str(tmp_path / "pairs.csv")
    r = load_recipe(_write(tmp_path, "model: {preset: qlip-tiny}\n"),
                    [f"data.train={train}", f"data.image_root={tmp_path}", "data.cache_mb=3", "data.batch_size=1"])
    task = get_task(r.task)(r, DistInfo())
    task.build_model()
    loader = task.build_loader()
    assert loader.cache_bytes == 3 << 20
    if source == "shards":  # and the tar shards' raw samples within the same figure
        assert loader.source.cache_bytes == 3 << 20
