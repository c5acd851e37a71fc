"""Stage 2: text tower dropped, encoder frozen, bottleneck + decoder trained with LPIPS + GAN;
the discriminator is checkpointed and resumed."""
import os
import warnings

import pytest
import torch

from _train_testutils import max_abs_diff, read_log, tiny_recipe, weights

STEPS = 4


class _Crash(Exception):
    pass


@pytest.fixture(scope="module")
def stage1(shapes_dir, tmp_path_factory):
    from qlip.train.recipe import Recipe
    from qlip.train import train
    out = tmp_path_factory.mktemp("s1") / "run"
    train(Recipe.from_dict(tiny_recipe(shapes_dir, optim={"steps": 2}, train={"ckpt_every": 0})), str(out))
    return out / "final"


def _stage2(shapes_dir, stage1):
    from qlip.train.recipe import Recipe
    d = tiny_recipe(shapes_dir,
                    model={"preset": None, "init": str(stage1)},
                    optim={"steps": STEPS, "warmup_steps": 0, "schedule": "constant", "optimizer": "adamw"},
                    loss={"alpha_a": 0.0, "alpha_p": 0.1, "alpha_g": 0.1, "alpha_s": 0.5,
                          "lpips_backbone": "random"},  # offline: no trunk weights (explicit opt-in)
                    gan={"disc_channels": 8, "disc_layers": 2, "disc_start": 0},
                    train={"stage": 2, "ckpt_every": 2})
    return Recipe.from_dict(d)


def test_stage2_trains_decoder_with_lpips_and_gan_and_resumes(shapes_dir, stage1, tmp_path):
    from qlip.train.state import latest_checkpoint, load_train_state
    from qlip.train import train
    recipe = _stage2(shapes_dir, stage1)
    ref = tmp_path / "ref"
    with warnings.catch_warnings():  # LPIPS offline: random VGG trunk (values not comparable to papers)
        warnings.simplefilter("ignore")
        summary = train(recipe, str(ref))
    assert summary["steps"] == STEPS

    before, after = weights(stage1), weights(ref / "final")
    assert not [k for k in after if k.startswith("text.")] and any(k.startswith("text.") for k in before)
    import qlip
    assert qlip.load(str(ref / "final")).text is None
    visual = [k for k in after if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual), "stage 2 changed the encoder"
    assert torch.equal(before["logit_scale"], after["logit_scale"])
    for prefix in ("bottleneck.", "decoder."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix

    log = read_log(ref)
    assert len(log) == STEPS
    for rec in log:
        for k in ("mse", "quant", "lpips", "g_gan", "d_loss", "logits_real", "logits_fake", "semantic"):
            assert k in rec and rec[k] == rec[k], (k, rec)
        assert "contrastive" not in rec
        assert 0.0 <= rec["semantic"] <= 2.0
        want = rec["mse"] + rec["quant"] + 0.1 * rec["lpips"] + rec["g_gan"] + 0.5 * rec["semantic"]
        assert abs(rec["loss"] - want) <= 1e-6 * max(1.0, abs(want)), (rec["loss"], want)  # logged total
    st = load_train_state(latest_checkpoint(str(ref / "checkpoints")))
    assert st["step"] == STEPS and "discriminator" in st and "d_optimizer" in st
    assert st["d_optimizer"]["state"], "discriminator optimizer state not saved"

    # crash right after step 3 (checkpoint at 2), resume: same generator AND discriminator
    out = tmp_path / "resumed"

    def crash(rec):
        if rec["step"] == 3:
            raise _Crash()

    with pytest.raises(_Crash):
        train(recipe, str(out), on_log=crash)
    assert os.path.basename(latest_checkpoint(str(out / "checkpoints"))) == "step_00000002"
    summary = train(recipe, str(out), resume=True)
    assert summary["steps_this_run"] == STEPS - 2
    assert max_abs_diff(weights(out / "final"), weights(ref / "final")) <= 1e-6
    st2 = load_train_state(latest_checkpoint(str(out / "checkpoints")))
    for k, v in st["discriminator"].items():
        assert torch.allclose(v.float(), st2["discriminator"][k].float(), atol=1e-6, rtol=0), k
    assert [r["step"] for r in read_log(out)] == list(range(1, STEPS + 1))


def test_stage2_can_replace_the_pixel_head(shapes_dir, stage1, tmp_path):
    """model.decoder_head: stage 2 starts from stage 1's weights with a fresh conv head, trains it,
    and the saved model carries the new head; on a preset it is refused (use model.overrides)."""
    from qlip import load
    from qlip.errors import ConfigError
    from qlip.train import train
    from qlip.train.recipe import Recipe
    d = tiny_recipe(shapes_dir, model={"preset": None, "init": str(stage1), "decoder_head": "conv",
                                       "decoder_head_channels": 4},
                    optim={"steps": 2, "warmup_steps": 0, "optimizer": "adamw"},
                    loss={"alpha_a": 0.0}, train={"stage": 2, "ckpt_every": 0})
    train(Recipe.from_dict(d), str(tmp_path / "run"))
    out, s1 = load(str(tmp_path / "run" / "final")), load(str(stage1))
    assert out.config.decoder.head == "conv" and out.config.decoder.head_channels == 4
    assert all(torch.equal(a, b) for a, b in zip(out.visual.state_dict().values(), s1.visual.state_dict().values()))
    bad = tiny_recipe(shapes_dir, model={"decoder_head": "conv"})
    with pytest.raises(ConfigError, match="model.decoder_head replaces the head of a model.init checkpoint"):
        train(Recipe.from_dict(bad), str(tmp_path / "bad"))


def test_stage2_bit_decorrelation_is_a_training_loss_only(shapes_dir, stage1, tmp_path):
    """loss.bit_decorrelation (ours, off by default) adds the bits' cross-correlation to the BSQ loss
    and logs it; it is not part of the saved model's config, so the model loads like any other."""
    from qlip.train import train
    from qlip.train.recipe import Recipe
    import qlip
    d = tiny_recipe(shapes_dir, model={"preset": None, "init": str(stage1)},
                    optim={"steps": 2, "warmup_steps": 0, "schedule": "constant", "optimizer": "adamw"},
                    loss={"alpha_a": 0.0, "bit_decorrelation": 0.5}, train={"stage": 2, "ckpt_every": 0})
    train(Recipe.from_dict(d), str(tmp_path / "run"))
    log = read_log(tmp_path / "run")
    assert all(r["bsq_bit_correlation"] >= 0 for r in log)
    assert qlip.load(str(tmp_path / "run" / "final")).quantizer.decorrelation == 0.0
    with pytest.raises(Exception, match="bit_decorrelation"):
        Recipe.from_dict(tiny_recipe(shapes_dir, loss={"bit_decorrelation": -1.0}))


def test_stage2_l1_reconstruction_term(shapes_dir, stage1, tmp_path):
    """loss.recon_kind: l1 (BSQ-ViT's pixel loss) replaces the MSE term: it is logged as 'l1',
    equals mean |x_hat - x| of the same pass, and the optimised loss is alpha_r * l1 + alpha_q * bsq.
    An unknown kind is a one-line config error."""
    import torch.nn.functional as F
    from qlip.errors import ConfigError
    from qlip.train import Engine, StepLog
    from qlip.train.recipe import Recipe
    d = tiny_recipe(shapes_dir, model={"preset": None, "init": str(stage1)},
                    optim={"steps": 2, "warmup_steps": 0, "schedule": "constant", "optimizer": "adamw"},
                    loss={"alpha_a": 0.0, "alpha_r": 2.0, "alpha_q": 0.1, "recon_kind": "l1"},
                    train={"stage": 2, "ckpt_every": 0})
    tr = Engine(Recipe.from_dict(d), str(tmp_path / "run"))
    tr.model.eval()  # no dropout: the same pass twice
    images = next(iter(tr.loader))["images"]
    log = StepLog()
    _, total = tr.task.image_terms(images, log, 1.0)
    assert "l1" in log.values and "mse" not in log.values
    with torch.no_grad():
        recon = tr.model.image_pass(images, embed=False).recon.float()
    assert abs(log.values["l1"] - float(F.l1_loss(recon, images))) < 1e-5
    assert abs(log.values["l1"] - float(F.mse_loss(recon, images))) > 1e-3  # not the MSE by another name
    assert abs(float(total.detach()) - (2.0 * log.values["l1"] + 0.1 * log.values["quant"])) < 1e-5
    with pytest.raises(ConfigError, match="loss.recon_kind must be one of mse, l1"):
        Recipe.from_dict(tiny_recipe(shapes_dir, loss={"recon_kind": "l2"}))
