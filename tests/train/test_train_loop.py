"""Training-loop behaviour: non-finite steps skipped, max_time_s stop + resume, injected loaders."""
import math

import torch

from _train_testutils import ListLoader, max_abs_diff, read_log, tiny_recipe, weights


def _batches(shapes_dir, n):
    from qlip.data.pipeline import image_transform, webdataset_loader
    import qlip
    m = qlip.load("qlip-tiny", pretrained=False)
    it = iter(webdataset_loader(str(shapes_dir / "shapes-train-*.tar"),
                                image_transform(32, m.image_mean, m.image_std), m.tokenizer, 8, shuffle=False))
    return [next(it) for _ in range(n)]


def _recipe(shapes_dir, steps, **train):
    from qlip.train.recipe import Recipe
    return Recipe.from_dict(tiny_recipe(shapes_dir, optim={"steps": steps, "warmup_steps": 0, "schedule": "constant"},
                                        train={"ckpt_every": 0, **train}))


def test_nonfinite_step_is_skipped(shapes_dir, tmp_path):
    from qlip.train import train
    good, other = _batches(shapes_dir, 2)
    bad = {**other, "images": torch.full_like(other["images"], float("nan"))}
    s = train(_recipe(shapes_dir, 2), str(tmp_path / "nan"), loader=ListLoader([good, bad]))
    assert s["steps"] == 2 and s["nonfinite_steps"] == 1
    log = read_log(tmp_path / "nan")
    assert math.isnan(log[1]["grad_norm"])
    train(_recipe(shapes_dir, 1), str(tmp_path / "one"), loader=ListLoader([good]))
    assert max_abs_diff(weights(tmp_path / "nan" / "final"), weights(tmp_path / "one" / "final")) == 0.0


def test_max_time_stops_with_a_checkpoint_and_resumes(shapes_dir, tmp_path):
    from qlip.train import train
    batches = _batches(shapes_dir, 3)
    out = str(tmp_path / "run")
    s = train(_recipe(shapes_dir, 3, max_time_s=1e-6), out, loader=ListLoader(batches))
    assert s["stopped_by"] == "max_time_s" and s["steps"] == 1
    s = train(_recipe(shapes_dir, 3), out, resume=True, loader=ListLoader(batches))
    assert s["stopped_by"] == "steps" and s["steps_this_run"] == 2
    train(_recipe(shapes_dir, 3), str(tmp_path / "ref"), loader=ListLoader(batches))
    assert max_abs_diff(weights(tmp_path / "run" / "final"), weights(tmp_path / "ref" / "final")) <= 1e-6
