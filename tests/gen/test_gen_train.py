"""The t2i task end to end on token shards of a few shapes images (qlip-tiny, random init): train
through the engine, load, sample, decode to PNGs through `qlip gen sample`; SIGKILL + --resume ==
uninterrupted; 2 gloo ranks (FSDP) == 1 process; a random tiny T5 encoder; one-line errors."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "train"))
from _train_testutils import env, launch_fsdp, max_abs_diff, qlip_cmd, read_log, run, weights  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def tokens(tiny_shapes, tmp_path_factory):
    """Token shards of the 32 tiny training images by a random-init qlip-tiny (seed 0)."""
    from qlip.data.tokens import tokenize_shards
    from qlip.gen.text import load_qlip
    out = str(tmp_path_factory.mktemp("gen_tokens"))
    model = load_qlip("qlip-tiny", random_init=True, seed=0)
    tokenize_shards(str(tiny_shapes / "shapes-train-*.tar"), model, out, model_name="qlip-tiny", batch_size=16,
                    progress=False)
    return out


def recipe(tokens, **sections):
    d = {"task": "t2i", "model": {"preset": "gpt-tiny"}, "head": {"kind": "split"},
         "text": {"encoder": "qlip", "model": "qlip-tiny", "random_init": True, "seed": 0, "max_len": 8},
         "data": {"train": tokens, "batch_size": 8},
         "optim": {"optimizer": "adamw", "lr": "3e-3", "warmup_steps": 2, "steps": STEPS, "weight_decay": 0.05},
         "train": {"log_every": 1, "ckpt_every": 2, "keep_ckpts": 2, "progress": False, "tensorboard": False}}
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    return d


def write(path, d):
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(path)


def _same_run(a_dir, b_dir, tol):
    """Logged loss, nll and grad_norm of every step agree to ``tol`` (relative above 1) and the final
    weights to ``tol`` (absolute)."""
    a, b = read_log(a_dir), read_log(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "nll", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
    assert max_abs_diff(weights(a_dir / "final"), weights(b_dir / "final")) <= tol


@pytest.fixture(scope="module")
def trained(tokens, tmp_path_factory):
    from qlip.gen.cli import load_gen_recipe
    from qlip.train import train
    tmp = tmp_path_factory.mktemp("gen_run")
    path = write(tmp / "t2i.yaml", recipe(tokens))
    summary = train(load_gen_recipe(path), str(tmp / "ref"))
    return tmp, path, summary


def test_train_load_sample_decode(trained, tokens, tmp_path):
    import qlip.gen
    tmp, _, summary = trained
    assert summary["task"] == "t2i" and summary["steps"] == STEPS
    log = read_log(tmp / "ref")
    assert log[0]["nll"] > 15 and log[-1]["nll"] < log[0]["nll"] - 0.5  # 28 bits: ln 2^28 = 19.4 nats at start
    assert all(r["loss"] == r["nll"] for r in log)
    gen = qlip.gen.load(str(tmp / "ref" / "final"))
    meta = json.loads((tmp / "ref" / "final" / "config.json").read_text())
    assert meta["tokenizer"] == {"model": "qlip-tiny", "random_init": True, "seed": 0}
    assert gen.model.cfg.grid_h == gen.model.cfg.grid_w == 4 and gen.model.cfg.bits == 28
    ids = gen.generate(["a red circle", "a blue square"], n=3, cfg=3.0, seed=5)
    assert ids.shape == (6, 4, 4) and int(ids.max()) < 2 ** 28
    assert torch.equal(ids, gen.generate(["a red circle", "a blue square"], n=3, cfg=3.0, seed=5))
    assert torch.equal(ids, gen.generate(["a red circle", "a blue square"], n=3, cfg=3.0, seed=5, use_cache=False))
    images = gen.decode(ids)
    assert images.shape == (6, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    out = tmp_path / "samples"
    run(qlip_cmd("gen", "sample", "--model", tmp / "ref" / "final", "--prompt", "a red circle",
                 "--prompt", "a blue square", "-n", "3", "--cfg", "3", "--seed", "5", "-o", out))
    from PIL import Image
    files = sorted(p.name for p in out.glob("p*.png"))
    assert files == [f"p{i:03d}-{j:03d}.png" for i in range(2) for j in range(3)]
    assert Image.open(out / "grid.png").size == (3 * 32, 2 * 32)
    # the CLI's first PNG is the decoded first sample of the same call
    first = torch.from_numpy(np.array(Image.open(out / files[0]).convert("RGB"))).permute(2, 0, 1).float() / 255
    assert (first - images[0]).abs().max() <= 1 / 255 + 1e-6


_KILL_AT_5 = """
import os, signal, sys
from qlip.gen.cli import load_gen_recipe
from qlip.train import train
def on_log(rec):
    if rec["step"] == 5:  # checkpoint 4 is on disk; steps 5+ must be redone exactly
        os.kill(os.getpid(), signal.SIGKILL)
train(load_gen_recipe(sys.argv[1]), sys.argv[2], on_log=on_log)
"""


def test_sigkill_then_resume_equals_uninterrupted(trained):
    tmp, path, _ = trained
    out = tmp / "killed"
    p = subprocess.run([sys.executable, "-c", _KILL_AT_5, path, str(out)], env=env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    run(qlip_cmd("gen", "train", path, "--out", out, "--resume"))
    _same_run(tmp / "ref", out, 1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_fsdp_ranks_equal_one_process(trained, tokens):
    """2 gloo ranks x 4 samples (decoder blocks sharded with FSDP2) == 1 process x 8 samples: the
    token loader gives ranks disjoint halves of the same global batch, caption dropout is a
    function of (seed, step, key), every sample has the same number of image tokens (so the mean
    of the ranks' per-token means is the global mean) and the text features do not depend on the
    batch. What is left is the order of float32 sums (the gradient of 8 samples vs the average of
    two 4-sample gradients: 3e-7 relative per tensor, 5e-16 in float64), so loss, nll and the
    final weights agree to 2e-6 (measured: 1e-7 relative, 4e-7 absolute after 6 steps; a wrong
    split of the data or another dropout rate differs by 1e-3 to 0.4 in the loss, 2e-2 in the weights).
    The logged grad_norm too: the engine sums its squares in float64 for one process and for
    sharded ranks alike (with torch's float32 clip_grad_norm_ in the 1-process run it differed by
    1e-5 to 5e-5 relative over the split head's 16,384-row tables)."""
    tmp, _, _ = trained
    two = write(tmp / "two.yaml", recipe(tokens, data={"batch_size": 4}, train={"fsdp": True}))
    if not launch_fsdp([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "qlip", "gen", "train",
                        two, "--out", str(tmp / "two")]):
        return  # torch < 2.9: refused with the one-line error (launch_fsdp asserted it)
    assert json.loads((tmp / "two" / "summary.json").read_text())["fsdp_sharded_units"] == 2
    _same_run(tmp / "ref", tmp / "two", 2e-6)


def test_caption_dropout_is_a_function_of_seed_step_and_key():
    from qlip.gen.task import caption_dropout
    keys = [f"k{i}" for i in range(4000)]
    d = caption_dropout(keys, 3, 0, 0.1)
    assert abs(float(d.float().mean()) - 0.1) < 0.015
    assert torch.equal(d[1000:1004], caption_dropout(keys[1000:1004], 3, 0, 0.1))  # batch-independent
    assert not torch.equal(d, caption_dropout(keys, 4, 0, 0.1))


def test_t5_encoder_random_config_and_offline_error():
    from qlip.errors import QLIPError
    from qlip.gen.text import TextFeatures, build_text_encoder
    spec = {"encoder": "t5", "max_len": 10, "seed": 0,
            "t5_config": {"vocab_size": 260, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 1, "num_heads": 2}}
    enc = TextFeatures(build_text_encoder(spec), cache_size=2)
    f = enc(["a red circle", "a much longer caption that is truncated", "a red circle"])
    assert f.shape == (3, 10, 16) and torch.equal(f[0], f[2])
    assert torch.all(f[0, 13 - 0:] == 0) and f[0, :12].abs().sum() > 0  # 12 bytes + end token, then zero pads
    assert torch.equal(build_text_encoder(spec)(["a red circle"])[0], f[0])  # same seed, same encoder
    with pytest.raises(QLIPError, match="cannot load the T5 encoder 'google/flan-t5-nonexistent'"):
        build_text_encoder({"encoder": "t5", "model": "google/flan-t5-nonexistent", "max_len": 8})


def test_qlip_text_features_with_the_pooled_aligned_embedding():
    from qlip.errors import ConfigError
    from qlip.gen.text import build_text_encoder
    spec = {"encoder": "qlip", "model": "qlip-tiny", "random_init": True, "seed": 0, "max_len": 8}
    plain, pooled = build_text_encoder(spec), build_text_encoder({**spec, "pooled": True})
    caps = ["a photo of a red circle", "a blue star"]
    f, g = plain(caps), pooled(caps)
    m = pooled.model
    D = m.config.embed_dim
    assert g.shape == (2, 8, m.config.text.width + D) and pooled.dim == g.shape[-1] and plain.dim == f.shape[-1]
    assert torch.equal(g[..., :f.shape[-1]], f)  # the token features are unchanged
    e = m.encode_text(m.tokenizer(caps), normalize=True).float() * D ** 0.5
    assert torch.allclose(g[:, 0, f.shape[-1]:], e, atol=1e-5) and torch.equal(g[:, 0, -D:], g[:, 7, -D:])
    assert not torch.allclose(g[0, 0, -D:], g[1, 0, -D:])  # one vector per caption
    with pytest.raises(ConfigError, match="text.pooled is for text.encoder=qlip"):
        build_text_encoder({"encoder": "t5", "max_len": 8, "pooled": True, "t5_config": {"d_model": 8}})


def test_recipe_errors_are_one_line():
    tokens = "tokens-dir"  # recipes are checked without reading data
    from qlip.errors import ConfigError
    from qlip.train import Recipe
    import qlip.gen  # noqa: F401  registers t2i
    with pytest.raises(ConfigError, match="head.kind must be one of split, bitwise, intra"):
        Recipe.from_dict(recipe(tokens, head={"kind": "flat"}))
    with pytest.raises(ConfigError, match="head.groups.*>= 2 with head.kind=intra"):
        Recipe.from_dict(recipe(tokens, head={"kind": "intra", "groups": 1}))
    with pytest.raises(ConfigError, match="text.model must name"):
        Recipe.from_dict(recipe(tokens, text={"model": None}))
    with pytest.raises(ConfigError, match="text.t5_config must be a mapping"):
        Recipe.from_dict(recipe(tokens, text={"t5_config": {"d_model": 8}}))
    with pytest.raises(ConfigError, match="text.pooled is for text.encoder=qlip"):
        Recipe.from_dict(recipe(tokens, text={"encoder": "t5", "model": None, "pooled": True}))
    with pytest.raises(ConfigError, match=r"kindd \(did you mean head.kind\?\)"):
        Recipe.from_dict(recipe(tokens, head={"kindd": "split"}))


def test_embedding_text_encoder_trains_saves_and_samples(tokens, tmp_path):
    """text.encoder=embedding: CLIP BPE ids -> a learned embedding + learned positions; no frozen
    encoder. Trains through the engine, reloads to the same NLL, samples reproducibly."""
    import qlip.gen
    from qlip.errors import ConfigError, QLIPError
    from qlip.gen.cli import load_gen_recipe
    from qlip.gen.text import TextFeatures, build_text_encoder
    from qlip.train import train
    enc = TextFeatures(build_text_encoder({"encoder": "embedding", "max_len": 8}))
    ids = enc(["a red circle", "a photo of a blue star on a noisy background"])
    assert ids.dtype == torch.int64 and ids.shape == (2, 8) and enc.vocab_size == 49408 and enc.dim == 0
    assert ids[0].tolist()[:5] == [49406, 320, 736, 7117, 49407] and ids[0, 5:].eq(0).all()  # start ... end, pads
    assert ids[1, 0] == 49406 and ids[1, -1] == 49407  # truncated with the end token kept
    path = write(tmp_path / "emb.yaml", recipe(tokens, text={"encoder": "embedding", "model": None}))
    summary = train(load_gen_recipe(path), str(tmp_path / "run"))
    log = read_log(tmp_path / "run")
    # from the uniform 2 x ln(16384) = 19.41 nats down: 0.53 on torch 2.14, 0.50 on torch 2.4 (6 steps)
    assert summary["steps"] == STEPS and log[-1]["nll"] < log[0]["nll"] - 0.3
    meta = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert meta["text"]["encoder"] == "embedding" and meta["config"]["text_vocab"] == 49408
    assert meta["tokenizer"]["model"] == "qlip-tiny"  # decoded by the shards' model
    gen = qlip.gen.load(str(tmp_path / "run" / "final"))
    cond = gen.model.cond
    assert cond.mlp is None and cond.embed.weight.shape == (49408, 32) and cond.pos.shape == (8, 32)
    # the prefix is embed(id) + pos(slot): the same word at two slots differs only by the positions
    p = cond(enc(["a red circle", "red a circle"]))
    assert torch.allclose(p[0, 2] - cond.pos[2], p[1, 1] - cond.pos[1])
    assert not torch.allclose(p[0], p[1])  # word order matters
    a = gen.generate(["a red circle"], n=2, cfg=3.0, seed=1)
    assert torch.equal(a, gen.generate(["a red circle"], n=2, cfg=3.0, seed=1, use_cache=False))
    with pytest.raises(QLIPError, match="embeds caption token ids"):
        cond(torch.zeros(1, 8, 4))
    with pytest.raises(ConfigError, match="text.pooled is for text.encoder=qlip.*embedding has none"):
        build_text_encoder({"encoder": "embedding", "max_len": 8, "pooled": True})
    with pytest.raises(ConfigError, match="text.max_len must be >= 2"):
        build_text_encoder({"encoder": "embedding", "max_len": 1})
