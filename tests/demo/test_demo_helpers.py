"""The demo's helpers without training: _checks, evaluate, merge_stages, the --fast / --resume guard."""
import json

import pytest
import torch

import qlip
from qlip.data.shapes import generate_shapes
from qlip.demo.qlip import (RECIPES, _check_word, _checks, _claim_out, _recipe, evaluate, fid_reference_stats,
                             merge_stages)
from qlip.errors import QLIPError


def _split(zs=0.63, zs_r=0.55, clip=0.61, psnr=25.2, r_psnr=25.9, rfid=(30.0, 20.0)):
    return {"qlip": {"zero_shot_top1": zs, "zero_shot_top1_recon": zs_r, "psnr": psnr,
                     "rfid_stage1": rfid[0], "rfid_stage2": rfid[1]},
            "clip_only": {"zero_shot_top1": clip}, "recon_only": {"psnr": r_psnr}}


def test_checks_exact_boundaries():
    assert all(_checks(_split()).values())
    c = _checks(_split(zs=0.59, zs_r=0.48, clip=0.66, psnr=24.9, r_psnr=26.0, rfid=(20.0, 20.5)))
    assert not any(c.values())
    assert _checks(_split(zs=0.60, zs_r=0.50, clip=0.60 / 0.9, psnr=25.0, r_psnr=26.0))["psnr >= 25 dB"]
    assert _checks(_split(rfid=(None, None)))["stage 2 lowers rFID"] is None  # not measured, not "passed"
    assert [_check_word(v, fast) for v, fast in ((True, False), (False, True), (False, False), (None, True))] == [
        "ok", "MISS (expected for --fast)", "MISS", "not measured"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes(str(out), n=1, size=64, heldout_n=12, val_n=0, progress=False)
    return str(out / "shapes-heldout-*.tar")


class _MeanColour:
    def __call__(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def test_evaluate_fractions_codes_clamped_recon_and_rfid(data):
    torch.manual_seed(0)
    model = qlip.load("qlip-demo", pretrained=False).eval()
    out = evaluate(model, data, batch_size=5, fid=_MeanColour(), rfid_n=8, judge=True)
    assert out["n_images"] == 12 and out["rfid_n"] == 8 and out["rfid"] >= 0
    assert set(out["codes"]) == {"distinct_codes", "code_usage", "code_entropy", "bit_entropy_mean"}
    assert 1 <= out["codes"]["distinct_codes"] <= 12 * 64 and 0 < out["codes"]["code_usage"] <= 1
    for key in ("zero_shot_top1", "zero_shot_top1_recon", "colour_acc", "kind_acc", "judge_colour_acc", "judge_kind_acc"):
        assert 0.0 <= out[key] <= 1.0, key
    # zero-shot on reconstructions classifies the clamped [0, 1] images, normalised again
    from qlip.data.evalsets import open_dataset
    from qlip.data.shapes import SHAPE_CLASSNAMES
    from qlip.model.preprocess import denormalize, normalize
    x, y = next(iter(open_dataset(data).batches(model.preprocess, 12)))
    seen = normalize(denormalize(model.reconstruct(x), model.image_mean, model.image_std).clamp(0, 1),
                     model.image_mean, model.image_std)
    pred = model.zero_shot(seen, [f"a photo of a {c}" for c in SHAPE_CLASSNAMES]).argmax(1)
    assert out["zero_shot_top1_recon"] == pytest.approx(float((pred == y).float().mean()))
    # the originals' statistics are reused when given: same rFID
    again = evaluate(model, data, batch_size=12, fid=_MeanColour(), fid_reference=out["_fid_reference"], rfid_n=8)
    assert again["rfid"] == pytest.approx(out["rfid"], rel=1e-6)


def test_fid_reference_stats_are_the_originals_of_evaluate(data):
    """The statistics the baselines' lane hands to the evaluation: the first n originals, back in
    [0, 1] as evaluate sees them, whatever the batch size; the rFID they give is evaluate's own."""
    from qlip.data.evalsets import open_dataset
    from qlip.eval.recon import FeatureStats
    from qlip.model.preprocess import denormalize
    torch.manual_seed(0)
    model = qlip.load("qlip-demo", pretrained=False).eval()
    x, _ = next(iter(open_dataset(data).batches(model.preprocess, 12)))
    direct = FeatureStats()
    direct.update(_MeanColour()(denormalize(x[:8], model.image_mean, model.image_std).clamp(0, 1)))
    ref = fid_reference_stats(model, data, _MeanColour(), 8, batch_size=5)
    assert ref.n == 8
    for a, b in zip(ref.compute(), direct.compute()):
        assert a == pytest.approx(b, abs=1e-9)
    own = evaluate(model, data, batch_size=5, fid=_MeanColour(), rfid_n=8)
    given = evaluate(model, data, batch_size=12, fid=_MeanColour(), fid_reference=ref, rfid_n=8)
    assert given["rfid"] == pytest.approx(own["rfid"], rel=1e-6) and given["_fid_reference"] is ref


def test_merge_stages(tmp_path):
    torch.manual_seed(0)
    s1 = qlip.load("qlip-tiny", pretrained=False)
    s2 = qlip.load("qlip-tiny", pretrained=False)
    s2.visual.load_state_dict(s1.visual.state_dict())
    s1.save_pretrained(tmp_path / "s1")
    s2.save_pretrained(tmp_path / "s2")
    merged = merge_stages(str(tmp_path / "s1"), str(tmp_path / "s2"))
    for a, b in zip(merged.decoder.state_dict().values(), s2.decoder.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(merged.text.state_dict().values(), s1.text.state_dict().values()):
        assert torch.equal(a, b)
    with torch.no_grad():
        next(iter(s2.visual.parameters())).add_(1.0)
    s2.save_pretrained(tmp_path / "s2b")
    with pytest.raises(RuntimeError, match="changed the vision encoder"):
        merge_stages(str(tmp_path / "s1"), str(tmp_path / "s2b"))


def test_merge_stages_with_a_new_pixel_head(tmp_path):
    """Stage 2 with model.decoder_head: conv: the merged model takes stage 2's head and config and
    keeps stage 1's text tower, so it tokenizes, decodes like stage 2 and still classifies."""
    torch.manual_seed(0)
    s1 = qlip.load("qlip-tiny", pretrained=False)
    s2 = s1.with_decoder_head("conv", 4)
    s2.drop_text()
    with torch.no_grad():
        next(iter(s2.decoder.conv_head.parameters())).add_(0.5)
    s1.save_pretrained(tmp_path / "s1")
    s2.save_pretrained(tmp_path / "s2")
    merged = merge_stages(str(tmp_path / "s1"), str(tmp_path / "s2"))
    assert merged.config.decoder.head == "conv" and merged.text is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ids = merged.tokenize(x)
        assert torch.equal(merged.detokenize(ids), s2.detokenize(ids))
        assert torch.equal(merged.encode_text(torch.ones(1, 8, dtype=torch.long)),
                           s1.encode_text(torch.ones(1, 8, dtype=torch.long)))


def test_fast_then_resume_is_refused_with_a_clear_message(tmp_path):
    _claim_out(str(tmp_path), fast=True, resume=False)
    assert json.loads((tmp_path / "demo-run.json").read_text()) == {"fast": True, "recipe": "demo"}
    with pytest.raises(QLIPError, match=r"holds a --fast \(smoke\) run: --resume without --fast cannot continue it"):
        _claim_out(str(tmp_path), fast=False, resume=True)
    _claim_out(str(tmp_path), fast=True, resume=True)  # same kind: fine
    _claim_out(str(tmp_path), fast=False, resume=False)  # a fresh full run may take the folder
    with pytest.raises(QLIPError, match="holds a full run"):
        _claim_out(str(tmp_path), fast=True, resume=True)


def test_resume_of_another_recipe_is_refused(tmp_path):
    _claim_out(str(tmp_path), fast=False, resume=False, recipe="paper")
    with pytest.raises(QLIPError, match="holds a run of --recipe paper: --resume with --recipe demo"):
        _claim_out(str(tmp_path), fast=False, resume=True, recipe="demo")
    _claim_out(str(tmp_path), fast=False, resume=True, recipe="paper")  # same recipe: fine
    (tmp_path / "demo-run.json").write_text('{"fast": false}')  # a folder written before --recipe existed
    _claim_out(str(tmp_path), fast=False, resume=True, recipe="demo")


def test_paper_recipe_is_the_papers_choices_at_the_demos_scale():
    """--recipe paper changes exactly the demo's deviations from the paper and nothing of its scale."""
    demo1, paper1 = _recipe("demo-stage1.yaml", RECIPES["demo"]["stage1"]), _recipe("demo-stage1.yaml", RECIPES["paper"]["stage1"])
    assert demo1.model.overrides == {"vision.stem": "conv", "vision.depth": 1}
    assert paper1.model.overrides == {"vision.stem": "patch", "vision.depth": 4}
    assert demo1.optim.lr_text == 0.0 and paper1.optim.lr_text > 0  # the text tower is trained
    assert (demo1.optim.optimizer, paper1.optim.optimizer) == ("adamw", "lamb")
    for key in ("steps", "warmup_steps"):
        assert getattr(paper1.optim, key) == getattr(demo1.optim, key)
    assert paper1.data.batch_size == demo1.data.batch_size
    assert (paper1.loss.alpha_r, paper1.loss.alpha_q, paper1.loss.alpha_a) == (demo1.loss.alpha_r, demo1.loss.alpha_q, demo1.loss.alpha_a)
    demo2, paper2 = _recipe("demo-stage2.yaml", RECIPES["demo"]["stage2"]), _recipe("demo-stage2.yaml", RECIPES["paper"]["stage2"])
    assert demo2.loss.alpha_s == paper2.loss.alpha_s == 0  # no embedding consistency (ours), chosen on validation
    assert demo2.loss.alpha_g == 0 and paper2.loss.alpha_g == 0.1  # the paper's GAN term
    assert paper2.loss.alpha_p == 0  # LPIPS stays off: no VGG weights offline
    assert paper2.gan.disc_start < paper2.optim.steps  # the discriminator does join
    assert (paper2.optim.steps, paper2.data.batch_size) == (demo2.optim.steps, demo2.data.batch_size)


def test_recon_only_baseline_has_its_own_tuned_codebook_weight():
    """The demo's reconstruction-only baseline (chosen on validation: it collapses with the stage-1
    recipe's codebook-entropy weight) quadruples gamma_1 and drops the per-sample entropy term
    (gamma_0 = 0); QLIP stage 1 and the paper recipe's baseline keep the preset's."""
    base = ["loss.alpha_a=0", "model.drop_text=true"]
    demo_ro = _recipe("demo-stage1.yaml", RECIPES["demo"]["stage1"] + base + RECIPES["demo"]["recon_only"])
    paper_ro = _recipe("demo-stage1.yaml", RECIPES["paper"]["stage1"] + base + RECIPES["paper"]["recon_only"])
    qlip1 = _recipe("demo-stage1.yaml", RECIPES["demo"]["stage1"])
    assert demo_ro.model.overrides["quantizer.gamma_1"] == 4 and demo_ro.model.overrides["quantizer.gamma_0"] == 0
    assert "quantizer.gamma_0" not in paper_ro.model.overrides and "quantizer.gamma_0" not in qlip1.model.overrides
    assert "quantizer.gamma_1" not in paper_ro.model.overrides and "quantizer.gamma_1" not in qlip1.model.overrides
    assert demo_ro.optim == qlip1.optim and demo_ro.data.batch_size == qlip1.data.batch_size  # same budget


def test_bit_decorrelation_is_the_demo_qlip_stage1s_only():
    """The fifteenth round's choice (validation, two seeds): QLIP's stage 1 decorrelates its bits at
    0.3; the reconstruction-only baseline (worse with it on validation) and the paper's recipe (it is
    ours, not the paper's) train without it, and the library's default stays 0."""
    from qlip.train.tasks.qlip import LossSection
    base = ["loss.alpha_a=0", "model.drop_text=true"]
    qlip1 = _recipe("demo-stage1.yaml", RECIPES["demo"]["stage1"])
    demo_ro = _recipe("demo-stage1.yaml", RECIPES["demo"]["stage1"] + base + RECIPES["demo"]["recon_only"])
    paper1 = _recipe("demo-stage1.yaml", RECIPES["paper"]["stage1"])
    paper_ro = _recipe("demo-stage1.yaml", RECIPES["paper"]["stage1"] + base + RECIPES["paper"]["recon_only"])
    assert qlip1.loss.bit_decorrelation == 0.3
    assert demo_ro.loss.bit_decorrelation == paper1.loss.bit_decorrelation == paper_ro.loss.bit_decorrelation == 0
    assert _recipe("demo-stage2.yaml", RECIPES["demo"]["stage2"]).loss.bit_decorrelation == 0  # stage 2: ninth round
    assert LossSection().bit_decorrelation == 0.0
