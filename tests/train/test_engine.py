"""The engine knows no model: a second task (a byte-level causal LM from qlip.nn blocks, and a toy
task defined here) trains through it with the same guarantees as QLIP: SIGKILL + --resume equals
an uninterrupted run, 2 ranks (FSDP) equal 1 process. Collectives stay on the group's device."""
import json
import os
import random
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from _train_testutils import env, launch_fsdp, max_abs_diff, qlip_cmd, read_log, run, weights, write_recipe
from qlip.train import Task
from qlip.train.recipe import DataSection

STEPS = 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "a red blue green circle square triangle is left of right above below the and".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + "." for _ in range(800)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def lm_recipe(corpus, **sections):
    d = {"task": "causal_lm",
         "model": {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64, "qk_norm": True},
         "data": {"train": str(corpus), "batch_size": 8, "seq_len": 24, "eval_batches": 2},
         "optim": {"optimizer": "adamw", "lr": "3e-3", "warmup_steps": 2, "steps": STEPS},
         "train": {"log_every": 1, "ckpt_every": 2, "keep_ckpts": 2, "progress": False, "tensorboard": False}}
    for sec, vals in sections.items():
        d.setdefault(sec, {}).update(vals)
    return d


def _same_run(a_dir, b_dir, tol):
    a, b = read_log(a_dir), read_log(b_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "ce", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= tol * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
    assert max_abs_diff(weights(a_dir / "final"), weights(b_dir / "final")) <= tol


def test_causal_lm_trains_evaluates_and_loads(corpus, tmp_path):
    from qlip.train import load_recipe, train
    from qlip.train.tasks.causal_lm import load_causal_lm
    recipe = load_recipe(write_recipe(tmp_path / "lm.yaml", lm_recipe(corpus, train={"eval_every": 5})))
    summary = train(recipe, str(tmp_path / "run"))
    log = read_log(tmp_path / "run")
    steps = [r for r in log if "ce" in r]
    assert steps[-1]["ce"] < steps[0]["ce"] - 0.5  # it learns (uniform over bytes: ln 256 = 5.5)
    assert all(r["loss"] == r["ce"] for r in steps)  # the logged total is the task's weighted sum
    evals = [r for r in log if "eval/val_ce" in r]
    assert [r["step"] for r in evals] == [5, STEPS] and summary["eval"]["val_ce"] == evals[-1]["eval/val_ce"]
    assert summary["task"] == "causal_lm" and summary["fsdp_sharded_units"] == 0
    model = load_causal_lm(str(tmp_path / "run" / "final"))
    assert model.cfg.qk_norm and model.cfg.kv_heads == 2
    with torch.no_grad():
        tokens = torch.randint(0, 256, (2, 7))
        trained = {k: v for k, v in weights(tmp_path / "run" / "final").items()}
        assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
        assert model(tokens).shape == (2, 7, 256)


_KILL_AT_5 = """
import os, signal, sys
from qlip.train import load_recipe, train
def on_log(rec):
    if rec["step"] == 5:  # checkpoint 4 is on disk; steps 5+ must be redone exactly
        os.kill(os.getpid(), signal.SIGKILL)
train(load_recipe(sys.argv[1]), sys.argv[2], on_log=on_log)
"""


def test_causal_lm_sigkill_then_resume_equals_uninterrupted(corpus, tmp_path):
    from qlip.train import load_recipe, train
    path = write_recipe(tmp_path / "lm.yaml", lm_recipe(corpus))
    train(load_recipe(path), str(tmp_path / "ref"))
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-c", _KILL_AT_5, path, str(out)], env=env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    run(qlip_cmd("train", path, "--out", out, "--resume"))
    _same_run(tmp_path / "ref", out, 1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_causal_lm_two_fsdp_ranks_equal_one_process(corpus, tmp_path):
    """2 gloo ranks x 4 windows with the decoder blocks sharded (FSDP2) == 1 process x 8 windows:
    batch i of the corpus loader is a function of (seed, i), ranks keep disjoint rows."""
    from qlip.train import load_recipe, train
    one = write_recipe(tmp_path / "one.yaml", lm_recipe(corpus))
    two = write_recipe(tmp_path / "two.yaml", lm_recipe(corpus, data={"batch_size": 4}, train={"fsdp": True}))
    train(load_recipe(one), str(tmp_path / "one"))
    if not launch_fsdp([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "qlip", "train", two,
                        "--out", str(tmp_path / "two")]):
        return  # torch < 2.9: refused with the one-line error (launch_fsdp asserted it)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["fsdp_sharded_units"] == 2
    _same_run(tmp_path / "one", tmp_path / "two", 1e-4)


# ---- a task defined outside the package, named by module:Class in the recipe --------------------
class ToyTask(Task):
    """Linear regression: the smallest task."""
    name = "toy"
    sections = {"data": DataSection}
    loss_weights = {"mse": 1.0}

    def build_model(self):
        self.model = torch.nn.Linear(3, 1)
        return self.model

    def build_loader(self):
        return _ToyLoader(self.r.data.batch_size)

    def micro_step(self, batch, scale, log, step):
        terms = {"mse": torch.nn.functional.mse_loss(self.model(batch["x"]), batch["y"])}
        log.add(terms, scale)
        return self.total(terms)

    def save_model(self, model, folder, state_dict=None):
        from qlip.io import atomic_write_text, write_safetensors
        os.makedirs(folder, exist_ok=True)
        write_safetensors(state_dict or model.state_dict(), os.path.join(folder, "model.safetensors"))
        atomic_write_text(os.path.join(folder, "config.json"), "{}\n")


class _ToyLoader:
    def __init__(self, batch_size):
        self.batch_size, self.index, self.stats = batch_size, 0, {"skipped": 0}

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.index)
            self.index += 1
            x = torch.randn(self.batch_size, 3, generator=g)
            yield {"x": x, "y": x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3}

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state[0]["index"]


def test_a_task_from_outside_the_package_trains_through_the_engine(tmp_path):
    import qlip.train.tasks as tasks
    from qlip.train import Recipe, train
    r = Recipe.from_dict({"task": f"{__name__}:ToyTask", "data": {"batch_size": 16},
                          "optim": {"optimizer": "adamw", "lr": 0.05, "warmup_steps": 0, "steps": 150,
                                    "weight_decay": 0.0},
                          "train": {"log_every": 50, "ckpt_every": 0, "progress": False, "tensorboard": False}})
    summary = train(r, str(tmp_path / "toy"))
    assert summary["last_log"]["mse"] < 1e-3 and summary["task"].endswith(":ToyTask")
    w = weights(tmp_path / "toy" / "final")["weight"]
    assert torch.allclose(w, torch.tensor([[1.0, -2.0, 0.5]]), atol=0.02)
    tasks.register_task("toy-alias", f"{__name__}:ToyTask")
    assert Recipe.from_dict({"task": "toy-alias", "optim": {"optimizer": "adamw"}}).task == "toy-alias"


def test_unknown_tasks_and_task_sections_fail_with_one_line():
    from qlip.errors import ConfigError
    from qlip.train import Recipe
    with pytest.raises(ConfigError, match="unknown task 'lamma'"):
        Recipe.from_dict({"task": "lamma"})
    with pytest.raises(ConfigError, match="unknown recipe sections: loss"):
        Recipe.from_dict({"task": "causal_lm", "loss": {"alpha_r": 1}})
    with pytest.raises(ConfigError, match=r"seq_lenn \(did you mean data.seq_len\?\)"):
        Recipe.from_dict({"task": "causal_lm", "data": {"seq_lenn": 3}})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        Recipe.from_dict({"task": "causal_lm", "model": {"n_heads": 4, "n_kv_heads": 3}})
    # every existing QLIP recipe is task qlip without saying so
    assert Recipe.from_dict({}).task == "qlip"


# ---- the cluster path: scalar collectives on the group's device ---------------------------------
def test_scalar_collectives_use_the_groups_device_as_nccl_requires():
    """NCCL accepts CUDA tensors only. A fake backend registered for `cuda` alone reproduces that
    restriction on this CPU machine: the old `mean_scalar` (a CPU tensor) fails on it, and the
    communication device we pick for such a group is CUDA; for the mixed group that setup()
    creates on GPUs, CPU scalars work."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from qlip.nn.collectives import all_reduce_floats, comm_device
    from qlip.train.distributed import backend_for

    assert backend_for(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl" and backend_for(torch.device("cpu")) == "gloo"
    assert comm_device() == torch.device("cpu")  # no process group
    dist.init_process_group("cuda:fake", store=FakeStore(), rank=0, world_size=2)
    try:
        with pytest.raises(RuntimeError, match="device type cpu"):  # the bug: a CPU scalar under NCCL
            dist.all_reduce(torch.tensor([1.0], dtype=torch.float64))
        assert comm_device().type == "cuda"
    finally:
        dist.destroy_process_group()
    dist.init_process_group("cpu:fake,cuda:fake", store=FakeStore(), rank=0, world_size=2)
    try:
        assert comm_device() == torch.device("cpu")
        assert all_reduce_floats([1.5, 2.0]) == [1.5, 2.0]  # the fake backend leaves values as they are
    finally:
        dist.destroy_process_group()


class _DtypeToyTask(ToyTask):
    """ToyTask whose forward runs under the task's autocast and records its output dtype."""
    seen = set()

    def micro_step(self, batch, scale, log, step):
        with self.autocast():
            y = self.model(batch["x"])
        _DtypeToyTask.seen.add(y.dtype)
        terms = {"mse": torch.nn.functional.mse_loss(y.float(), batch["y"])}
        log.add(terms, scale)
        return self.total(terms)


@pytest.mark.parametrize("amx, expected", [(True, "bf16"), (False, "fp32")])
def test_train_precision_auto_is_bf16_only_where_bf16_matmul_is_fast(tmp_path, monkeypatch, amx, expected):
    import qlip.nn.precision as P
    from qlip.errors import ConfigError
    from qlip.train import Recipe, train
    monkeypatch.setattr(P, "cpu_has_amx_bf16", lambda: amx)
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2"}))  # no avx512_bf16: the rule is AMX alone
    _DtypeToyTask.seen = set()
    d = {"task": f"{__name__}:_DtypeToyTask", "data": {"batch_size": 4},
         "optim": {"optimizer": "adamw", "lr": 0.05, "warmup_steps": 0, "steps": 2},
         "train": {"precision": "auto", "device": "cpu", "log_every": 1, "ckpt_every": 0, "progress": False,
                   "tensorboard": False}}
    summary = train(Recipe.from_dict(d), str(tmp_path / "toy"))
    assert summary["precision"] == expected
    assert _DtypeToyTask.seen == {torch.bfloat16 if expected == "bf16" else torch.float32}
    with pytest.raises(ConfigError, match="fp32, bf16 or auto"):
        Recipe.from_dict({**d, "train": {**d["train"], "precision": "fp16"}})
