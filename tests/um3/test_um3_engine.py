"""UM3 through the training engine: it trains and evaluates, SIGKILL + --resume equals an
uninterrupted run, 2 gloo ranks (FSDP) equal 1 process, and `qlip um3 generate` reads the result."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import yaml

from _um3_utils import tiny_llama, write_corpus, write_token_shards

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "tests", "train"))
from _train_testutils import launch_fsdp  # noqa: E402

STEPS = 6


def _env():
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = REPO + os.pathsep + e.get("PYTHONPATH", "")
    return e


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("um3e")
    return {"llama": tiny_llama(d / "llama"), "text": write_corpus(d / "corpus.txt"),
            "tokens": write_token_shards(d / "tokens")}


def recipe(tmp_path, setup, name="r.yaml", **sections):
    r = {"task": "um3",
         "model": {"init": setup["llama"], "bits": 8, "groups": 2},
         "data": {"text": setup["text"], "tokens": setup["tokens"], "batch_size": 4, "seq_len": 40, "r0": 0.75,
                  "rT": 0.25, "calm_down_steps": 4, "eval_batches": 1},
         "optim": {"optimizer": "adamw", "lr": 3e-3, "warmup_steps": 1, "steps": STEPS},
         "loss": {},
         "train": {"log_every": 1, "ckpt_every": 2, "keep_ckpts": 2, "progress": False, "tensorboard": False}}
    for sec, vals in sections.items():
        r[sec].update(vals)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(r))
    return str(path)


def _log(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


def _same_run(a, b, tol):
    from safetensors.torch import load_file
    la, lb = [r for r in _log(a) if "ce" in r], [r for r in _log(b) if "ce" in r]
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, STEPS + 1))
    for ra, rb in zip(la, lb):
        for k in ("loss", "ce", "ce_text", "ce_i2t", "ce_t2i", "grad_norm", "text_fraction"):
            assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
    wa, wb = (load_file(os.path.join(x, "final", "model.safetensors")) for x in (a, b))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= tol


_KILL_AT_5 = """
import os, signal, sys
import qlip.um3
from qlip.train import load_recipe, train
def on_log(rec):
    if rec.get("step") == 5:  # checkpoint 4 is on disk; steps 5+ must be redone exactly
        os.kill(os.getpid(), signal.SIGKILL)
train(load_recipe(sys.argv[1]), sys.argv[2], on_log=on_log)
"""


@pytest.mark.parametrize("layout", ["subtoken", "token"])
def test_trains_logs_the_mix_and_resumes_exactly_after_sigkill(setup, tmp_path, layout):
    from qlip.train import load_recipe, train
    import qlip.um3  # noqa: F401  (registers the task)
    path = recipe(tmp_path, setup, train={"eval_every": STEPS}, model={"layout": layout})
    summary = train(load_recipe(path), str(tmp_path / "ref"))
    log = [r for r in _log(tmp_path / "ref") if "ce" in r]
    assert summary["task"] == "um3" and "text_ppl" in summary["eval"]
    assert [r["text_fraction"] for r in log] == [round(4 * ((0.25 - 0.75) / 4 * (s - 4) + 0.25)) / 4 if s <= 4
                                                 else 0.25 for s in range(STEPS)]
    assert all(abs(r["loss"] - r["ce"]) < 1e-9 for r in log)
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", _KILL_AT_5, path, str(out)], env=_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    from qlip.cli import main  # in-process: the same code path as the command line, one interpreter less
    assert main(["um3", "train", path, "--out", str(out), "--resume"]) == 0
    _same_run(tmp_path / "ref", out, 1e-6)
    # the trained model generates through the CLI
    assert main(["um3", "generate", "--model", str(out / "final"), "--prompt", "a red", "--max-new-tokens", "5",
                 "-o", str(tmp_path / "t.txt")]) == 0
    assert (tmp_path / "t.txt").read_text().startswith("a red")
    if layout == "token":  # the chain is trained and saved with the model
        from safetensors.torch import load_file
        w = load_file(str(out / "final" / "model.safetensors"))
        assert "chain.prev.0.weight" in w


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("layout", ["subtoken", "token"])
def test_two_fsdp_ranks_equal_one_process(setup, tmp_path, layout):
    """2 gloo ranks x 2 rows (decoder blocks sharded with FSDP2) == 1 process x 4 rows: the mixed
    batch is a function of (seed, index), ranks keep disjoint rows, the loss divides by the global
    number of targets. With the learned visual bits (model.visual_bits) and, in the token layout, the
    sub-token chain, both kept with the root module."""
    from qlip.train import load_recipe, train
    import qlip.um3  # noqa: F401
    bits = {"init": setup["llama"], "bits": 8, "groups": 2, "visual_bits": True, "layout": layout}
    train(load_recipe(recipe(tmp_path, setup, "one.yaml", model=bits)), str(tmp_path / "one"))
    two = recipe(tmp_path, setup, "two.yaml", model=bits, data={"batch_size": 2}, train={"fsdp": True})
    if not launch_fsdp([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "qlip", "um3", "train",
                        two, "--out", str(tmp_path / "two")], environ=_env()):
        return  # torch < 2.9: refused with the one-line error (launch_fsdp asserted it)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["fsdp_sharded_units"] == 2
    _same_run(tmp_path / "one", tmp_path / "two", 1e-4)


def _step_and_nll(task, model, batch):
    """(the task's loss, its logged terms, the per-position NLLs) of one micro-step on ``batch``."""
    terms = {}

    class Log:
        def add(self, t, scale):
            terms.update(t)

    ce = float(task.micro_step(batch, 1.0, Log(), 0).detach())
    with torch.no_grad():
        nll = model.nll(batch["tokens"][:, :-1], batch["labels"], "split")
    return ce, terms, nll


@pytest.mark.parametrize("average", ["tokens", "rows"])
def test_loss_average_tokens_and_rows_match_their_formulas(setup, tmp_path, average):
    """loss.average: "tokens" is the mean NLL over every target of the batch (a 20-target drawing
    outweighs a 3-token caption); "rows" averages each row's token mean over the rows, so every
    sample counts once. Checked against the per-position NLLs of the same batch."""
    from qlip.train import load_recipe
    from qlip.train.plan import build_task
    from qlip.um3.loss import IGNORE
    import qlip.um3  # noqa: F401
    r = load_recipe(recipe(tmp_path, setup, loss={"average": average}))
    task, model = build_task(r, "cpu")
    batch = task.build_loader().batch(0)
    ce, terms, nll = _step_and_nll(task, model, batch)
    mask = batch["labels"] != IGNORE
    tokens_mean = float(nll.sum() / mask.sum())
    rows_mean = float((nll.sum(1) / mask.sum(1)).mean())
    assert len(set(mask.sum(1).tolist())) > 1  # rows of different target counts: the two averages differ
    assert abs(tokens_mean - rows_mean) > 1e-3
    assert ce == pytest.approx(rows_mean if average == "rows" else tokens_mean, rel=1e-5)
    assert float(terms["ce"].detach()) == pytest.approx(ce, rel=1e-6)


def test_i2t_image_loss_scores_the_unconditional_drawing_and_averages_per_segment(setup, tmp_path):
    """data.i2t_image_loss: an image-to-text row's image targets are those of the unconditional
    drawing of the same image (its caption dropped), its caption targets are unchanged, and with
    loss.average: rows image and caption are two segments, each averaged like a row."""
    from qlip.train import load_recipe
    from qlip.train.plan import build_task
    from qlip.um3.loss import IGNORE
    from qlip.um3.mixing import I2T, T2I
    import qlip.um3  # noqa: F401
    plain = load_recipe(recipe(tmp_path, setup, "plain.yaml", loss={"average": "rows"},
                               data={"r0": 0.0, "rT": 0.0, "i2t_share": 1.0}))
    scored = load_recipe(recipe(tmp_path, setup, "scored.yaml", loss={"average": "rows"},
                                data={"r0": 0.0, "rT": 0.0, "i2t_share": 1.0, "i2t_image_loss": True}))
    task0, _ = build_task(plain, "cpu")
    task, model = build_task(scored, "cpu")
    loader0, loader = task0.build_loader(), task.build_loader()
    seq0, t0, split0 = loader0._row(I2T, 0, 3, drop_caption=False)
    seq, t, split = loader._row(I2T, 0, 3, drop_caption=False)
    useq, ut, _ = loader._row(T2I, 0, 3, drop_caption=True)
    assert seq == seq0 and split == split0
    assert t[split:] == t0[split:] and not any(t0[:split])            # the caption, as before
    n_img = sum(ut)                                                   # sub-tokens + <eoi>
    assert t[:split] == ut[:split] and sum(t[:split]) == n_img > 0    # the unconditional drawing's targets
    assert seq[:split + 1] == useq[:split + 1]
    batch = loader.batch(0)
    assert int(batch["n_segments"]) == 2 * len(batch["kind"]) and bool((batch["kind"] == I2T).all())
    ce, terms, nll = _step_and_nll(task, model, batch)
    mask = batch["labels"] != IGNORE
    pos = torch.arange(mask.shape[1])[None]
    img, cap = mask & (pos < batch["split"][:, None]), mask & (pos >= batch["split"][:, None])
    seg_means = torch.cat([(nll * img).sum(1) / img.sum(1), (nll * cap).sum(1) / cap.sum(1)])
    assert ce == pytest.approx(float(seg_means.mean()), rel=1e-5)
    assert float(terms["ce_i2t"]) == pytest.approx(float((nll * cap).sum() / cap.sum()), rel=1e-5)  # captions only


def test_loss_average_rejects_unknown_values(setup, tmp_path):
    from qlip.errors import ConfigError
    from qlip.train import load_recipe
    import qlip.um3  # noqa: F401
    with pytest.raises(ConfigError, match="loss.average"):
        load_recipe(recipe(tmp_path, setup, loss={"average": "samples"}))
