"""torchrun with 2 CPU processes (gloo) == 1 process with the same global batch."""
import json
import socket

import pytest
import torch
import torch.distributed as dist

from _train_testutils import max_abs_diff, read_log, run, tiny_recipe, weights, write_recipe

STEPS = 4


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_ranks_match_one_process_with_the_same_global_batch(shapes_dir, tmp_path):
    # data.global_batches: every rank reads the 1-process stream of global batches (8) and keeps
    # its half, so the union of the two ranks' batches is the 1-process batch. Every term is then
    # exact: MSE and the per-sample BSQ terms (per-rank means of equal shares), the gathered
    # InfoNCE and the BSQ codebook entropy (quantizer.gamma_1 = 1 in qlip-tiny), whose code
    # distribution is averaged over the tokens of both ranks.
    common = dict(model={"preset": "qlip-tiny"}, optim={"steps": STEPS, "warmup_steps": 1}, train={"ckpt_every": 0})
    one = write_recipe(tmp_path / "one.yaml", tiny_recipe(shapes_dir, **common))
    d2 = tiny_recipe(shapes_dir, **common)
    d2["data"].update(batch_size=4, global_batches=True)
    two = write_recipe(tmp_path / "two.yaml", d2)

    from qlip.train.recipe import load_recipe
    from qlip.train import train
    train(load_recipe(one), str(tmp_path / "one"))

    port = _free_port()
    import sys
    run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "qlip", "train", two,
         "--out", str(tmp_path / "two")], timeout=300)

    a, b = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "mse", "contrastive", "quant", "bsq_persample_entropy", "bsq_codebook_entropy", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= 1e-4 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
    assert max_abs_diff(weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final")) < 1e-4


_CRASH_AT_3 = '''
import sys
from qlip.train.recipe import load_recipe
from qlip.train import train


class Crash(Exception):
    pass


def on_log(rec):  # called on rank 0 only; torchrun then stops the other rank
    if rec["step"] == 3:
        raise Crash()


try:
    train(load_recipe(sys.argv[1]), sys.argv[2], on_log=on_log)
except Crash:
    sys.exit(3)
'''


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp_two_ranks_match_one_process_and_resume(shapes_dir, tmp_path):
    # train.fsdp: every transformer block sharded over the 2 ranks (FSDP2). A run killed after
    # step 3 (checkpoint at 2) and resumed under FSDP == 1 process, unsharded, same global batch.
    # The two ranks also cache gradients (chunks of 2 of their 4 samples): the gathered InfoNCE
    # and the BSQ codebook entropy of the global batch (gamma_1 = 1 in qlip-tiny) stay exact.
    import subprocess
    import sys

    from _train_testutils import env, launch_fsdp

    import qlip
    from qlip.compat import FSDP_ON_CPU
    from qlip.train.recipe import load_recipe
    from qlip.train.state import latest_checkpoint, load_train_state
    from qlip.train import train

    common = dict(model={"preset": "qlip-tiny"}, optim={"steps": STEPS, "warmup_steps": 1, "optimizer": "adamw"})
    one = write_recipe(tmp_path / "one.yaml", tiny_recipe(shapes_dir, **common, train={"ckpt_every": 0}))
    d2 = tiny_recipe(shapes_dir, **common)
    d2["data"].update(batch_size=4, global_batches=True)
    d2["train"].update(fsdp=True, ckpt_every=2, contrastive_chunk=2)
    two = write_recipe(tmp_path / "two.yaml", d2)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1"]
    if not FSDP_ON_CPU:  # torch < 2.9: the run is refused with the one-line error (launch_fsdp asserts it)
        assert not launch_fsdp(torchrun + ["--master_port", str(_free_port()), "-m", "qlip", "train", two,
                                           "--out", str(tmp_path / "two")])
        return
    train(load_recipe(one), str(tmp_path / "one"))

    script = tmp_path / "crash_at_3.py"
    script.write_text(_CRASH_AT_3)
    out = tmp_path / "two"
    p = subprocess.run(torchrun + ["--master_port", str(_free_port()), str(script), two, str(out)],
                       env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0, "the run was meant to stop after step 3"
    ckpt = latest_checkpoint(str(out / "checkpoints"))
    assert ckpt is not None and ckpt.endswith("step_00000002")
    # the sharded run's checkpoint is in the unsharded format: full weights and full Adam moments
    model = qlip.load(ckpt)
    shapes = {n: tuple(t.shape) for n, t in model.named_parameters()}
    st = load_train_state(ckpt)
    moments = [s["exp_avg"] for s in st["optimizer"]["state"].values()]
    assert moments and all(type(m) is torch.Tensor for m in moments)  # plain tensors, not shards
    # one full-size moment per parameter (every parameter trains in this recipe), not half of it
    assert sorted(tuple(m.shape) for m in moments) == sorted(shapes.values())

    run(torchrun + ["--master_port", str(_free_port()), "-m", "qlip", "train", two, "--out", str(out), "--resume"],
        timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["fsdp_sharded_units"] == 6 and summary["steps_this_run"] == STEPS - 2  # 2+2+2 blocks
    a, b = read_log(tmp_path / "one"), read_log(out)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for k in ("loss", "mse", "contrastive", "quant", "bsq_codebook_entropy", "grad_norm"):
            assert abs(ra[k] - rb[k]) <= 1e-4 * max(1.0, abs(ra[k])), (ra["step"], k, ra[k], rb[k])
    assert max_abs_diff(weights(tmp_path / "one" / "final"), weights(out / "final")) < 1e-4


def test_exit_process_skips_finalisation_only_after_a_process_group(monkeypatch, capsys):
    """A single process exits normally (SystemExit with the code); a process that initialised a
    group flushes its streams and leaves with os._exit (no interpreter finalisation, where gloo's
    worker threads abort the process: qlip.train.distributed.exit_process)."""
    import qlip.train.distributed as D
    monkeypatch.setattr(D, "_GROUP_USED", False)
    with pytest.raises(SystemExit) as e:
        D.exit_process(3)
    assert e.value.code == 3
    calls = []

    def fake_exit(code):
        calls.append(code)
        raise RuntimeError("os._exit")  # stop here as os._exit would

    monkeypatch.setattr(D, "_GROUP_USED", True)
    monkeypatch.setattr(D.os, "_exit", fake_exit)
    print("written before the exit", end="")
    with pytest.raises(RuntimeError, match="os._exit"):
        D.exit_process(0)
    assert calls == [0] and capsys.readouterr().out == "written before the exit"
