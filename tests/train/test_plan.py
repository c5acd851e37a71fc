"""`qlip train --dry-run` on every shipped recipe and the cost model of `qlip plan`."""
import glob
import json
import os

import pytest
import torch

from qlip.errors import ConfigError
from qlip.train.dryrun import dry_run, format_dry_run
from qlip.train.plan import (GPUS, OVERHEAD_GIB, Measurement, _variant, count_parameters, load_measurement,
                             make_plan, measure, measure_step)
from qlip.train.recipe import Recipe, load_recipe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = sorted(glob.glob(os.path.join(REPO, "qlip", "configs", "*.yaml")))
PAPER = {"b-16-256": "qlip-b-16-256", "b-8-256": "qlip-b-8-256", "l-14-392": "qlip-l-14-392"}


def test_every_size_has_both_stages():
    names = {os.path.basename(p) for p in RECIPES}
    for size in PAPER:
        assert {f"qlip-{size}-stage1.yaml", f"qlip-{size}-stage2.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_dry_run_every_shipped_recipe(path, tmp_path):
    recipe = load_recipe(path)
    report = dry_run(recipe, str(tmp_path), path, world_size=128)
    text = format_dry_run(report)
    assert "nothing trained" in text
    assert json.load(open(tmp_path / "dry_run.json")) == json.loads(json.dumps(report))
    assert not (tmp_path / "checkpoints").exists()
    p = report["parameters"]
    assert p["total"] == sum(p["per_module"].values()) > 0
    assert p["trainable"] == sum(g["parameters"] for g in p["groups"])
    plan = report["plan"]
    assert plan["global_batch"] == recipe.data.batch_size * 128 * recipe.train.grad_accum
    assert plan["samples_seen"] == plan["global_batch"] * recipe.optim.steps
    lrs = {g["name"].removesuffix("_nd"): g["lr"] for g in p["groups"]}
    o = recipe.optim
    for group, lr in (("visual", o.lr_visual), ("text", o.lr_text), ("generator", o.lr_generator)):
        assert lrs.get(group, 0.0) == (o.lr if lr is None else lr)


@pytest.mark.parametrize("size", PAPER)
def test_paper_recipes_follow_table_8(size):
    s1 = load_recipe(os.path.join(REPO, "qlip", "configs", f"qlip-{size}-stage1.yaml"))
    s2 = load_recipe(os.path.join(REPO, "qlip", "configs", f"qlip-{size}-stage2.yaml"))
    assert s1.model.preset == s2.model.preset == PAPER[size]
    for r, batch in ((s1, 65536), (s2, 16384)):  # on Table 8's 128 devices
        assert r.data.batch_size * r.train.grad_accum * 128 == batch
        assert (r.optim.steps, r.optim.warmup_steps, r.optim.schedule, tuple(r.optim.betas)) == \
            (120000, 2000, "cosine", (0.9, 0.95))
        assert r.optim.weight_decay == 0.05 and r.train.precision == "bf16"
    o1, o2 = s1.optim, s2.optim
    assert (o1.optimizer, o1.lr, o1.lr_visual, o1.lr_text, o1.lr_generator, o1.grad_clip) == \
        ("lamb", 5e-4, 2e-4, 2e-5, 2e-3, 5.0)
    assert (o2.optimizer, o2.lr, o2.lr_visual, o2.lr_text, o2.lr_generator, o2.grad_clip) == \
        ("adamw", 5e-4, 0.0, 0.0, 1e-4, 1.0)
    L1, L2 = s1.loss, s2.loss
    assert (L1.alpha_r, L1.alpha_a, L1.alpha_q, L1.alpha_p, L1.alpha_g, L1.alpha_z) == (1e3, 1, 1, 0, 0, 1)
    assert (L2.alpha_r, L2.alpha_a, L2.alpha_q, L2.alpha_p, L2.alpha_g, L2.alpha_z) == (1, 0, 1, 0.1, 0.1, 0)
    assert s2.gan.disc_lr == 1e-4 and s1.train.stage == 1 and s2.train.stage == 2


def test_dry_run_cli(tmp_path):
    from qlip.cli import main
    path = os.path.join(REPO, "qlip", "configs", "qlip-b-16-256-stage2.yaml")
    assert main(["train", path, "data.batch_size=64", "--dry-run", "--out", str(tmp_path)]) == 0
    report = json.load(open(tmp_path / "dry_run.json"))
    assert report["plan"]["per_rank_batch"] == 64
    assert any("does not exist yet" in n for n in report["notes"])
    with pytest.raises(ConfigError, match="lr_visul"):
        load_recipe(path, ["optim.lr_visul=1"])


def _tiny(**train):
    d = {"model": {"preset": "qlip-tiny"}, "data": {"batch_size": 4},
         "optim": {"optimizer": "adamw", "steps": 10, "warmup_steps": 1}, "loss": {}, "train": train}
    return Recipe.from_dict(d)


def test_depth_extrapolation_is_exact():
    """measure() counts towers at depth 1 and 2 and extrapolates; at qlip-tiny's depths (2, 2, 2)
    a direct count of the whole model must agree."""
    r = _tiny()
    m = measure(r, batch=2)
    assert m.depths == {"vision": 2, "decoder": 2, "text": 2}
    direct = measure_step(_variant(r), batch=2)
    assert m.flops_per_sample == pytest.approx(direct["flops"] / 2, rel=1e-9)
    assert m.activation_bytes_per_sample == pytest.approx(direct["saved_bytes"] / 2, rel=0.02)
    assert all(v > 0 for v in m.tower_block_flops.values())


def test_flops_linear_in_batch():
    r = _variant(_tiny())
    one, three = measure_step(r, batch=1), measure_step(r, batch=3)
    assert three["flops"] == pytest.approx(3 * one["flops"], rel=0.01)
    assert three["saved_bytes"] == pytest.approx(3 * one["saved_bytes"], rel=0.05)


def _fake_measurement(**kw):
    base = dict(flops_per_sample=1e12, tower_block_flops={"vision": 1e10, "decoder": 1e10},
                activation_bytes_per_sample=2 ** 30, tower_block_activation_bytes={"vision": 2 ** 25, "decoder": 2 ** 25},
                tower_block_input_bytes={"vision": 2 ** 20, "decoder": 2 ** 20}, depths={"vision": 12, "decoder": 12},
                image_size=256, batch=2, precision="fp32", seconds=0.0)
    base.update(kw)
    return Measurement(**base)


def _params(total=10 ** 8, trainable=10 ** 8, sharded=9 * 10 ** 7):
    return {"total": total, "trainable": trainable, "sharded": sharded, "trainable_sharded": min(sharded, trainable),
            "per_module": {"visual": total}, "lpips": 0, "discriminator": 0, "discriminator_tensors": 0,
            "buffer_bytes": 1000, "trainable_tensors": 10, "largest_trainable": 10 ** 6,
            "largest_trainable_replicated": 10 ** 5, "autocast_parameters": 8 * 10 ** 7, "autocast_parameters_sharded": 7 * 10 ** 7,
            "input_bytes_per_sample": 1000,
            "groups": [{"name": "all", "lr": 1e-3, "weight_decay": 0.0, "tensors": 10, "parameters": trainable}]}


def test_plan_arithmetic():
    r = _tiny(grad_accum=2)
    p = make_plan(r, _fake_measurement(), _params(), gpu="a100", gpus=8, nodes=2, mfu=0.5)
    assert p.world_size == 16 and p.global_batch == 4 * 2 * 16 and p.samples_seen == p.global_batch * 10
    assert p.step_seconds == pytest.approx(1e12 * 4 * 2 / (GPUS["a100"].peak_bf16_flops * 0.5))
    assert p.gpu_hours == pytest.approx(p.total_days * 24 * 16)
    gib = 2 ** 30
    g = {k: v * gib for k, v in p.memory_gib.items()}
    assert g["weights"] == pytest.approx(4e8 + 1000)                 # fp32 parameters + buffers
    assert g["optimizer_states"] == pytest.approx(8e8 + 4 * 10)      # AdamW: 2 moments + a step per tensor
    assert g["inputs"] == pytest.approx(4 * 1000)
    assert p.memory_gib["activations"] == pytest.approx(4.0)
    assert g["autocast_copies"] == 0                                 # fp32 recipe
    assert g["backward_overlap"] == g["gradients"] == pytest.approx(4e8)  # accumulation: all gradients exist
    assert g["optimizer_transient"] == pytest.approx(4e8)            # CUDA foreach AdamW: one group-sized list
    assert p.memory_gib["peak_phase"] == 1.0                         # the backward phase is the larger
    assert p.memory_gib["total"] == pytest.approx((4e8 + 1000 + 8e8 + 40 + 4000 + 4e8) / gib + 4.0 + OVERHEAD_GIB)
    bf16 = make_plan(Recipe.from_dict({**r.to_dict(), "train": {"grad_accum": 2, "precision": "bf16"}}),
                     _fake_measurement(), _params(), gpu="a100", gpus=8, nodes=2)
    assert bf16.memory_gib["autocast_copies"] * gib == pytest.approx(2 * 8e7)
    lamb = make_plan(Recipe.from_dict({**r.to_dict(), "optim": {"optimizer": "lamb", "steps": 10}}),
                     _fake_measurement(activation_bytes_per_sample=1.0), _params(), gpu="a100", gpus=8, nodes=2)
    assert lamb.memory_gib["optimizer_transient"] * gib == pytest.approx(8e8)  # foreach LAMB: two lists
    assert lamb.memory_gib["optimizer_states"] * gib == pytest.approx(8e8 + 4 * 1)  # a step per group
    assert lamb.memory_gib["peak_phase"] == 0.0


def test_plan_fsdp_checkpointing_and_chunks():
    m, pr = _fake_measurement(), _params()
    plain = make_plan(_tiny(), m, pr, gpus=8)
    fsdp = make_plan(_tiny(fsdp=True), m, pr, gpus=8)
    assert fsdp.memory_gib["weights"] == pytest.approx((4 * (10 ** 7 + 9 * 10 ** 7 / 8) + 1000) / 2 ** 30)
    # FSDP: single-tensor update of the largest (shard of a) tensor: max(10^5, 10^6 / 8) elements, two temporaries
    assert fsdp.memory_gib["optimizer_transient"] == pytest.approx(8 * 10 ** 6 / 8 / 2 ** 30)
    fsdp_bf16 = make_plan(Recipe.from_dict({**_tiny().to_dict(), "train": {"fsdp": True, "precision": "bf16"}}),
                          m, pr, gpus=8)
    assert fsdp_bf16.memory_gib["autocast_copies"] == pytest.approx(2 * (10 ** 7 + 7 * 10 ** 7 / 8) / 2 ** 30)
    assert fsdp.flops_per_sample == plain.flops_per_sample
    ck = make_plan(Recipe.from_dict({**_tiny().to_dict(), "model": {"preset": "qlip-tiny", "grad_checkpointing": True}}),
                   m, pr, gpus=8)
    assert ck.activation_bytes_per_sample < plain.activation_bytes_per_sample
    assert ck.flops_per_sample == pytest.approx(1e12 + 24 * 1e10 / 3)
    chunk = make_plan(_tiny(contrastive_chunk=2), m, pr, gpus=8)
    assert chunk.activation_samples == 2 and chunk.memory_gib["activations"] == pytest.approx(2.0)
    big = make_plan(Recipe.from_dict({**_tiny().to_dict(), "data": {"batch_size": 200}}), m, pr, gpu="h100")
    assert not big.fits and any("does not fit" in n for n in big.notes)
    with pytest.raises(ConfigError, match="--gpu"):
        make_plan(_tiny(), m, pr, gpu="v100")


def test_plan_cli_json(tmp_path):
    from qlip.cli import main
    out = tmp_path / "plan.json"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("model: {preset: qlip-tiny}\noptim: {optimizer: adamw, steps: 100}\ndata: {batch_size: 16}\n")
    torch.set_num_threads(1)
    assert main(["plan", str(recipe), "--gpus", "2", "--gpu", "h200", "--json", str(out)]) == 0
    p = json.load(open(out))
    assert p["world_size"] == 2 and p["global_batch"] == 32 and p["gpu"] == GPUS["h200"].name
    assert p["parameters"]["total"] == count_parameters(load_recipe(str(recipe)))["total"]
    assert p["flops_per_sample"] > 0 and p["memory_gib"]["activations"] > 0
    # the stored measurement is reused for another batch / GPU: same FLOPs per sample, nothing re-measured
    again = tmp_path / "again.json"
    assert main(["plan", str(recipe), "data.batch_size=32", "--gpu", "a100", "--measured", str(out),
                 "--json", str(again)]) == 0
    q = json.load(open(again))
    assert q["flops_per_sample"] == p["flops_per_sample"] and q["per_rank_batch"] == 32
    assert q["memory_gib"]["activations"] == pytest.approx(2 * p["memory_gib"]["activations"])
    assert main(["plan", str(recipe), "model.overrides.vision.depth=3", "--measured", str(out)]) == 2
    with pytest.raises(ConfigError, match="another model"):
        load_measurement(str(out), load_recipe(str(recipe), ["model.overrides.vision.depth=3"]))


def test_cpu_attention_is_counted():
    """FlopCounterMode counts 0 for the CPU SDPA kernel; the plan adds torch's SDPA formula."""
    from torch.utils.flop_counter import FlopCounterMode
    from qlip.train.plan import _cpu_attention_flops
    q = torch.randn(2, 3, 16, 8, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as fc:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == 4 * 2 * 3 * 16 * 16 * 8
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as fc:
        out.sum().backward()
    assert fc.get_total_flops() == 10 * 2 * 3 * 16 * 16 * 8
