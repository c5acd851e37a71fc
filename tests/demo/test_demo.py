"""`qlip demo --fast`: the README's main job end to end, at smoke-test size."""
import json

import pytest
import torch

import qlip
from qlip.cli import main


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--fast", "--out", str(out)]) == 0
    return out


def test_demo_outputs(demo_dir):
    m = json.loads((demo_dir / "metrics.json").read_text())
    for key in ("zero_shot_top1", "zero_shot_top1_recon", "colour_acc", "kind_acc", "psnr", "lpips_stage1",
                "lpips_stage2"):
        assert isinstance(m["qlip"][key], float), key
    assert 0 <= m["qlip"]["zero_shot_top1"] <= 1 and m["qlip"]["psnr"] > 0
    assert isinstance(m["clip_only"]["zero_shot_top1"], float) and isinstance(m["recon_only"]["psnr"], float)
    assert set(m["checks"]) and all(isinstance(v, bool) for v in m["checks"].values())
    assert m["timings_s"]["lanes"] == (2 if torch.get_num_threads() >= 2 else 1)
    html = (demo_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # grid, bit usage, loss curves
    assert "Understanding vs reconstruction" in html and "CLIP-only" in html
    # the final model tokenizes and classifies
    model = qlip.load(str(demo_dir / "qlip"))
    assert model.text is not None and model.image_size == 64
    ids = model.tokenize(torch.zeros(1, 3, 64, 64))
    x = model.preprocess(model.postprocess(model.detokenize(ids)))
    probs = model.zero_shot(x, ["a photo of a red circle", "a photo of a blue star"])
    assert probs.shape == (1, 2)


def test_demo_resume_reuses_finished_runs(demo_dir, capfd):
    # the first run trained in two lanes (two processes); this one reuses all four runs in one
    two_lanes = json.loads((demo_dir / "metrics.json").read_text())
    if two_lanes["timings_s"]["lanes"] == 2:
        assert two_lanes["timings_s"]["evaluated_in_lane"] == ["clip_only", "qlip_stage1", "recon_only"]
    assert main(["demo", "--fast", "--resume", "--lanes", "1", "--out", str(demo_dir)]) == 0
    out = capfd.readouterr().out
    assert out.count("finished earlier") == 4
    # with two lanes the baselines' lane evaluated the baselines and the test originals' FID statistics;
    # in one lane the main process evaluates everything: the same figures
    one_lane = json.loads((demo_dir / "metrics.json").read_text())
    assert one_lane["timings_s"]["evaluated_in_lane"] == []
    for split in (lambda m: m, lambda m: m["validation"]):
        a, b = split(two_lanes), split(one_lane)
        for block in ("clip_only", "recon_only"):
            assert a[block].keys() == b[block].keys()
            for key, value in a[block].items():
                assert value == pytest.approx(b[block][key], rel=1e-4, abs=1e-6), (block, key)
    # ... and, since stop 37, QLIP's stage 1 (evaluated by that lane while stage 2 trains)
    stage1 = ("psnr_stage1", "lpips_stage1", "rfid_stage1", "judge_colour_acc_stage1", "judge_kind_acc_stage1")
    for key in stage1 + ("rfid_stage2",):
        assert two_lanes["qlip"][key] == pytest.approx(one_lane["qlip"][key], rel=1e-4, abs=1e-6), key
    for key in ("psnr_stage1", "lpips_stage1"):
        assert two_lanes["validation"]["qlip"][key] == pytest.approx(one_lane["validation"]["qlip"][key], rel=1e-4)


def test_resume_with_other_stage2_steps_trains_only_the_new_stage2(demo_dir, capfd):
    """`--resume --stage2-steps N` on a finished demo reuses stage 1 and both baselines, trains stage 2
    for N steps in its own folder (the recipe-length run is kept, never continued), and the final
    model, metrics and report are the new stage 2's."""
    before = json.loads((demo_dir / "metrics.json").read_text())
    assert before["stage2_steps"] == 4  # --fast's stage 2
    assert main(["demo", "--fast", "--resume", "--lanes", "1", "--stage2-steps", "6", "--out", str(demo_dir)]) == 0
    out = capfd.readouterr().out
    assert out.count("finished earlier") == 3 and "qlip_stage2_6steps: 6 steps" in out
    summary = json.loads((demo_dir / "qlip_stage2_6steps" / "summary.json").read_text())
    assert summary["steps"] == 6
    assert json.loads((demo_dir / "qlip_stage2" / "summary.json").read_text())["steps"] == 4  # untouched
    m = json.loads((demo_dir / "metrics.json").read_text())
    assert m["stage2_steps"] == 6
    assert set(m["training_precision"].values()) == {"fp32"}  # the recipes' precision by default
    assert m["qlip"]["psnr_stage1"] == before["qlip"]["psnr_stage1"]  # the same stage-1 model
    assert "stage 2: 6 steps" in (demo_dir / "report.html").read_text()
    from qlip.demo.qlip import run_demo
    with pytest.raises(ValueError, match="stage2_steps must be >= 1"):
        run_demo(str(demo_dir), fast=True, resume=True, stage2_steps=0)


def test_resume_retrains_only_runs_whose_recipe_changed(demo_dir, capfd, monkeypatch):
    """`--resume` after a demo setting changed: the run trained with the old setting is moved aside
    (never deleted) and trained again, the others are reused; a retrained stage 1 makes stage 2 stale."""
    from qlip.demo.qlip import RECIPES
    args = ["demo", "--fast", "--resume", "--lanes", "1", "--out", str(demo_dir)]
    old_final = json.loads((demo_dir / "recon_only" / "summary.json").read_text())["final_model"]
    changed = [o.replace("gamma_1=4", "gamma_1=2") for o in RECIPES["demo"]["recon_only"]]
    assert changed != RECIPES["demo"]["recon_only"]  # one setting of the baseline's own recipe changes
    monkeypatch.setitem(RECIPES["demo"], "recon_only", changed)
    assert main(args) == 0
    out = capfd.readouterr().out
    assert "recon_only: trained with other settings (model.overrides.quantizer.gamma_1: 4 -> 2)" in out
    assert out.count("finished earlier") == 3  # stage 1, stage 2, CLIP-only
    assert (demo_dir / "recon_only.previous" / "summary.json").is_file()  # the old run, kept
    assert old_final.startswith(str(demo_dir / "recon_only"))
    import yaml
    r = yaml.safe_load((demo_dir / "recon_only" / "recipe.yaml").read_text())
    assert r["model"]["overrides"]["quantizer.gamma_1"] == 2
    monkeypatch.setitem(RECIPES["demo"], "stage1", ["loss.alpha_q=0.2"])
    assert main(args) == 0
    out = capfd.readouterr().out
    assert "qlip_stage1: trained with other settings (loss.alpha_q: 0.1 -> 0.2)" in out
    assert "qlip_stage2: trained with other settings (its input run was trained again)" in out
    # the baselines derive from stage 1's recipe: reconstruction-only changed with it, CLIP-only (alpha_q
    # = 0 there) did not and is reused
    assert "recon_only: trained with other settings (loss.alpha_q: 0.1 -> 0.2)" in out
    assert out.count("finished earlier") == 1 and "clip_only: finished earlier" in out
    # --precision bf16: a setting of all four trainings, so all four train again, in bf16
    assert main(args + ["--precision", "bf16"]) == 0
    out = capfd.readouterr().out
    assert out.count("train.precision: 'fp32' -> 'bf16'") == 3 and "finished earlier" not in out
    assert "qlip_stage2: trained with other settings (its input run was trained again)" in out
    m = json.loads((demo_dir / "metrics.json").read_text())
    assert m["training_precision"] == {k: "bf16" for k in ("qlip_stage1", "clip_only", "recon_only", "qlip_stage2")}
    from qlip.demo.qlip import run_demo
    with pytest.raises(ValueError, match="precision must be fp32, bf16 or auto"):
        run_demo(str(demo_dir), fast=True, resume=True, precision="fp16")


def test_recipe_changes_reads_the_saved_recipe_with_todays_defaults(tmp_path):
    from qlip.demo.resume import recipe_changes, stale_run
    from qlip.train.recipe import Recipe, recipe_to_yaml
    d = {"model": {"preset": "qlip-tiny"}, "optim": {"lr": 1e-3, "steps": 10}, "train": {"log_every": 5}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(recipe_to_yaml(Recipe.from_dict(d)))
    assert recipe_changes(str(run), Recipe.from_dict(d)) == []
    assert recipe_changes(str(tmp_path / "none"), Recipe.from_dict(d)) == []  # nothing saved: nothing to compare
    # logging cadence is not a change; the learning rate is; ignored keys are not compared
    d2 = {**d, "optim": {"lr": 2e-3, "steps": 10}, "train": {"log_every": 1}}
    assert recipe_changes(str(run), Recipe.from_dict(d2)) == ["optim.lr: 0.001 -> 0.002"]
    assert recipe_changes(str(run), Recipe.from_dict(d2), ignore=("optim.lr",)) == []
    # a saved recipe without a key added since (at its default) is not a change
    (run / "recipe.yaml").write_text("model:\n  preset: qlip-tiny\noptim:\n  lr: 0.001\n  steps: 10\n")
    assert recipe_changes(str(run), Recipe.from_dict(d)) == []
    (run / "recipe.yaml").write_text("optim:\n  no_such_option: 1\n")
    assert "cannot be read with this version" in recipe_changes(str(run), Recipe.from_dict(d))[0]
    assert not stale_run(str(run), Recipe.from_dict(d), resume=False, label="x")  # only under --resume
    assert stale_run(str(run), Recipe.from_dict(d), resume=True, label="x")
    assert not run.exists() and (tmp_path / "run.previous" / "recipe.yaml").is_file()


def test_a_failing_baselines_lane_is_reported(tmp_path):
    """The spawned baselines process reports its exception to the demo, which raises it."""
    import multiprocessing

    from qlip.demo.lanes import lane_entry, wait_for_lane
    from qlip.demo.qlip import BASELINES_LANE, _lane
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=lane_entry, args=(_lane, ([("clip_only", "no-such-recipe.yaml", [])], str(tmp_path),
                                                        False, 1), results))
    proc.start()
    try:
        with pytest.raises(RuntimeError, match="baselines' lane .* failed") as e:
            wait_for_lane(proc, results, BASELINES_LANE, poll_s=0.5)
        assert "no-such-recipe.yaml" in str(e.value)
    finally:
        proc.join(timeout=60)
    assert proc.exitcode == 0  # the error travelled as a result, the process ended normally


def test_a_dead_baselines_lane_is_reported():
    import multiprocessing
    import os

    from qlip.demo.lanes import wait_for_lane
    from qlip.demo.qlip import BASELINES_LANE
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=os._exit, args=(7,))  # dies without putting a result
    proc.start()
    with pytest.raises(RuntimeError, match=r"ended without a result \(exit code 7\)"):
        wait_for_lane(proc, results, BASELINES_LANE, poll_s=0.2)
    proc.join()


def test_a_lane_returns_tensors_after_it_has_exited():
    """A lane's result holding tensors reaches the parent even when the lane process has already
    exited (a queue would send them as shared-memory handles that die with it)."""
    import time

    from qlip.demo.lanes import run_two_lanes
    mine, theirs = run_two_lanes(lambda: time.sleep(3.0) or "here", torch.arange, (5,), name="qlip-test-lane",
                                 what="the test lane", poll_s=0.2)
    assert mine == "here" and torch.equal(theirs, torch.arange(5))
