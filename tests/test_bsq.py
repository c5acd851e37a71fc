import math
import os

import pytest
import torch

from qlip.errors import DataError
from qlip.quant import BinarySphericalQuantizer, bits_to_ids, group_ids_to_ids, ids_to_bits, ids_to_group_ids


def test_sign_zero_is_minus_one_and_scale():
    q = BinarySphericalQuantizer(embed_dim=4, group_size=2)
    u = torch.tensor([[0.0, 1e-9, -1e-9, 3.0]])
    codes, ids, _, _ = q(u)
    s = 1 / math.sqrt(4)
    assert torch.equal(codes, torch.tensor([[-s, s, -s, s]]))
    assert ids.item() == 0b0101


def test_msb_first_and_exact_28_bit_ids():
    q = BinarySphericalQuantizer(embed_dim=28, group_size=7)
    bits = torch.randint(0, 2, (1000, 28))
    ids = bits_to_ids(bits)
    expected = torch.tensor([int("".join(map(str, b.tolist())), 2) for b in bits])
    assert torch.equal(ids, expected)
    assert ids.dtype == torch.int64
    # all-ones is the largest id; channel 0 alone is 2**27
    assert bits_to_ids(torch.ones(28, dtype=torch.long)).item() == 2 ** 28 - 1
    one_hot = torch.zeros(28, dtype=torch.long)
    one_hot[0] = 1
    assert bits_to_ids(one_hot).item() == 2 ** 27
    # codes -> ids -> codes is the identity, and ids survive bf16 inputs
    u = torch.nn.functional.normalize(torch.randn(500, 28), dim=-1)
    codes, ids, _, _ = q(u)
    assert torch.equal(q.ids_to_codes(ids), codes)
    assert torch.equal(q.codes_to_ids(u.bfloat16()), q.codes_to_ids(u.bfloat16().float()))


@pytest.mark.parametrize("L,g", [(28, 7), (28, 14), (28, 1), (12, 4), (62, 2)])
def test_conversions_round_trip(L, g):
    ids = torch.randint(0, 2 ** min(L, 62) - 1, (64,), dtype=torch.int64) if L < 62 else \
        torch.randint(0, 2 ** 62 - 1, (64,), dtype=torch.int64)
    assert torch.equal(bits_to_ids(ids_to_bits(ids, L)), ids)
    gids = ids_to_group_ids(ids, L, g)
    assert gids.shape == (64, L // g) and int(gids.max()) < 2 ** g
    assert torch.equal(group_ids_to_ids(gids, g), ids)
    # group 0 holds the most significant bits
    assert torch.equal(gids[:, 0], ids >> (L - g))


def test_straight_through_gradient_is_identity():
    q = BinarySphericalQuantizer(embed_dim=8, group_size=4)
    u = torch.randn(3, 8, requires_grad=True)
    codes, _, _, _ = q(u, compute_loss=False)
    (codes * torch.arange(8.0)).sum().backward()
    assert torch.allclose(u.grad, torch.arange(8.0).expand(3, 8) * q.scale)


def _brute_force_entropies(u, tau, L, scale):
    """Full 2**L computation (small L only)."""
    codes = (ids_to_bits(torch.arange(2 ** L), L).double() * 2 - 1) * scale
    p = (2 * tau * u.double() @ codes.T).softmax(-1)
    ent = lambda x: -(x * x.clamp_min(1e-300).log()).sum(-1)  # noqa: E731
    return ent(p).mean(), ent(p.mean(0))


@pytest.mark.parametrize("mode", ["group", "analytical"])
def test_entropies_against_brute_force(mode):
    L, tau = 8, 1.0
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(50, L, dtype=torch.float64), dim=-1)
    q = BinarySphericalQuantizer(embed_dim=L, group_size=L, inv_temperature=tau, persample_entropy=mode)
    ps, cb = q.entropy_terms(u)
    ps_ref, cb_ref = _brute_force_entropies(u, tau, L, q.scale)
    # one group of L bits: both terms are exact up to the 1e-8 smoothing (2**8 entries: ~1e-5)
    assert abs(ps.item() - ps_ref.item()) < 1e-4
    assert abs(cb.item() - cb_ref.item()) < 1e-4
    # smaller groups: per-sample term stays exact (it factorises), codebook term is an upper bound
    q2 = BinarySphericalQuantizer(embed_dim=L, group_size=2, inv_temperature=tau, persample_entropy=mode)
    ps2, cb2 = q2.entropy_terms(u)
    assert abs(ps2.item() - ps_ref.item()) < 1e-4
    assert cb2.item() >= cb_ref.item() - 1e-6


def test_loss_formula_and_commitment():
    torch.manual_seed(0)
    q = BinarySphericalQuantizer(embed_dim=28, group_size=7, inv_temperature=10.0, beta=0.25,
                                 gamma_0=1.0, gamma_1=0.5).train()
    u = torch.nn.functional.normalize(torch.randn(4, 16, 28), dim=-1).requires_grad_()
    codes, ids, loss, stats = q(u)
    commit = ((codes.detach() - u) ** 2).sum(-1).mean()
    expected = 0.25 * commit + (stats["persample_entropy"] - 0.5 * stats["codebook_entropy"]) / 10.0
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(u.grad).all() and u.grad.abs().sum() > 0
    # eval mode skips the loss unless asked
    q.eval()
    _, _, l0, s0 = q(u)
    assert l0.item() == 0 and s0 == {}


def test_28_bits_never_allocates_2_pow_28():
    """g = 14 at L = 28 stays linear in L: memory far below one 2**28 float tensor (1 GiB)."""
    q = BinarySphericalQuantizer(embed_dim=28, group_size=14)
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        """Records the largest tensor any operator produces (forward and backward)."""
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    u = torch.nn.functional.normalize(torch.randn(2, 16, 28), dim=-1).requires_grad_()
    with LargestTensor():
        codes, ids, loss, _ = q(u, compute_loss=True)
        loss.backward()
    assert q.group_codebook.numel() == 2 ** 14 * 14
    # the largest intermediate is one group's codebook against the tokens (2 x 16 x 2**14), never 2**28
    assert 2 ** 14 <= LargestTensor.largest <= 2 * 16 * 2 ** 14 * 2, LargestTensor.largest
    with pytest.raises(ValueError, match="group_size"):
        BinarySphericalQuantizer(embed_dim=28, group_size=28)


def test_invalid_ids_rejected():
    q = BinarySphericalQuantizer(embed_dim=4, group_size=2)
    with pytest.raises(DataError, match=r"\[0, 2\*\*4\)"):
        q.ids_to_codes(torch.tensor([16]))
    with pytest.raises(DataError, match="integer"):
        q.ids_to_codes(torch.tensor([1.0]))
    with pytest.raises(DataError):
        q.ids_to_codes(torch.tensor([-1]))


# ---- codebook entropy over the global batch (data parallelism) ---------------------------------
def _bsq_step(proj, q, x):
    """Quantiser loss of ``x`` (tokens (n, T, 6) -> u (n, T, 8)); backward; (loss, stats, u.grad)."""
    proj.zero_grad()
    u = torch.nn.functional.normalize(proj(x), dim=-1)
    u.retain_grad()
    _, _, loss, stats = q(u, compute_loss=True)
    loss.backward()
    return loss.detach(), stats, u.grad


def _bsq_ddp_worker(rank, world, init_file):
    import torch.distributed as dist
    from qlip.nn.collectives import all_reduce_gradients_
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # equal halves with every term on; unequal shares (4 + 9 images) with the codebook term only
        # (per-sample terms are per-rank means, exact only for equal shares)
        cases = [((6, 6), dict(beta=0.25, gamma_0=1.0, gamma_1=1.0)), ((4, 9), dict(gamma_0=0.0, gamma_1=1.0))]
        for mode in ("group", "analytical"):
            for sizes, weights in cases:
                torch.manual_seed(0)  # same weights and data on both ranks
                proj = torch.nn.Linear(6, 8).double()
                x = torch.randn(sum(sizes), 3, 6, dtype=torch.float64)
                q = BinarySphericalQuantizer(embed_dim=8, group_size=4, inv_temperature=2.0,
                                             persample_entropy=mode, distributed=False, **weights)
                ref_loss, ref_stats, ref_du = _bsq_step(proj, q, x)  # one process, whole batch
                ref_grads = [p.grad.clone() for p in proj.parameters()]

                rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
                local_cb = _bsq_step(proj, q, x[rows])[1]["codebook_entropy"]
                assert abs(float(local_cb - ref_stats["codebook_entropy"])) > 1e-3  # per rank: differs

                q.distributed = None  # the default: on under the initialised process group
                loss, stats, du = _bsq_step(proj, q, x[rows])
                all_reduce_gradients_(proj.parameters())  # the trainer's (DDP's) mean over ranks
                mean_loss = loss.clone()
                dist.all_reduce(mean_loss)
                torch.testing.assert_close(mean_loss / world, ref_loss, atol=1e-6, rtol=0)
                torch.testing.assert_close(stats["codebook_entropy"], ref_stats["codebook_entropy"],
                                           atol=1e-6, rtol=0)
                for p, g in zip(proj.parameters(), ref_grads):
                    torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=0)
                # d(mean of the ranks' losses) / du: this rank's rows of the 1-process gradient
                torch.testing.assert_close(du / world, ref_du[rows], atol=1e-6, rtol=0)
        dist.barrier()  # both ranks done before the teardown (tests/losses/test_losses_distributed.py)
    finally:
        dist.destroy_process_group()


def test_codebook_entropy_over_the_global_batch_under_two_gloo_ranks(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed gloo")
    os.environ.pop("MASTER_ADDR", None)
    mp.spawn(_bsq_ddp_worker, args=(2, str(tmp_path / "pg_init")), nprocs=2, join=True)


def test_distributed_true_needs_a_process_group():
    q = BinarySphericalQuantizer(embed_dim=4, group_size=2, distributed=True)
    with pytest.raises(RuntimeError, match="process group"):
        q(torch.randn(3, 4), compute_loss=True)
    q.distributed = None  # default: local average without a process group
    assert torch.isfinite(q(torch.randn(3, 4), compute_loss=True)[2])


def test_decorrelation_term_adds_the_bits_cross_correlation():
    """BSQ's opt-in decorrelation (the recipe's loss.bit_decorrelation): loss + w * cross_correlation(u),
    logged as bit_correlation; 0 for independent numbers, L - 1 for copies of one."""
    from qlip.quant.bsq import cross_correlation
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(4, 16, 28), dim=-1)
    plain = BinarySphericalQuantizer(embed_dim=28, group_size=7).train()
    q = BinarySphericalQuantizer(embed_dim=28, group_size=7, decorrelation=2.0).train()
    _, _, l0, s0 = plain(u)
    _, _, l1, s1 = q(u)
    assert "bit_correlation" not in s0 and torch.allclose(s1["bit_correlation"], cross_correlation(u))
    assert torch.allclose(l1, l0 + 2.0 * cross_correlation(u))
    z = torch.randn(8192, 28, generator=torch.Generator().manual_seed(1))
    assert float(cross_correlation(z)) < 0.01
    assert abs(float(cross_correlation(z[:, :1].expand(-1, 28))) - 27.0) < 0.05


@pytest.mark.parametrize("persample", ["group", "analytical"])
def test_entropies_under_bf16_autocast_are_the_fp32_ones(persample):
    """Under bf16 autocast (a bf16 training) the loss's entropies are computed in fp32: the einsum
    of the soft code distribution used to run in bf16, and both ~19-nat entropies came out equal to
    bf16's rounding, so the quantizer loss read 0."""
    q = BinarySphericalQuantizer(embed_dim=28, group_size=7, persample_entropy=persample)
    u = torch.nn.functional.normalize(torch.randn(256, 28, generator=torch.Generator().manual_seed(0)), dim=-1)
    ref = q.entropy_terms(u)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q.entropy_terms(u)
        _, _, loss, stats = q.train()(u.clone().requires_grad_())
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert stats["persample_entropy"] != stats["codebook_entropy"] and loss.dtype == torch.float32
