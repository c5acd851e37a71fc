"""torchrun with 2 CPU processes (gloo) == 1 process with the same global batch."""
import socket

import pytest
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
    from qlip.train.trainer import train
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
