"""``qlip.nn.causal_attention.sdpa`` with bf16 on a CPU: computed in fp32 where the CPU has no AMX
(torch's bf16 CPU flash kernel is slower there, benchmarks/cpu_bf16.py), with torch's bf16 kernel
where it has AMX; the same values and gradients either way within bf16 rounding."""
import pytest
import torch

import qlip.nn.causal_attention as CA
import qlip.nn.precision as P


def _qkv(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 10, 16, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_on_a_cpu_without_amx_is_fp32_attention_rounded_once(monkeypatch, causal):
    monkeypatch.setattr(P, "cpu_has_amx_bf16", lambda: False)
    q, k, v = _qkv(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = CA.sdpa(q, k, v, is_causal=causal)
    assert y.dtype == torch.bfloat16
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
    assert torch.equal(y, ref.bfloat16())  # exactly the fp32 result, rounded once
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))
    # with a boolean mask and grouped-query heads (k / v with fewer heads) the same
    qm, km, vm = _qkv(torch.bfloat16, seed=1)
    mask = torch.ones(10, 10, dtype=torch.bool).tril()
    y = CA.sdpa(qm, km[:, :2], vm[:, :2], mask=mask)
    ref = CA._sdpa(qm.float(), km[:, :2].float(), vm[:, :2].float(), mask, False, 0.0)
    assert torch.equal(y, ref.bfloat16())


def test_bf16_with_amx_and_fp32_use_torchs_kernel_as_is(monkeypatch):
    called = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **kw: called.append(q.dtype) or real(q, *a, **kw))
    monkeypatch.setattr(P, "cpu_has_amx_bf16", lambda: True)
    q, k, v = _qkv(torch.bfloat16)
    CA.sdpa(q, k, v, is_causal=True)
    q32, k32, v32 = _qkv(torch.float32)
    monkeypatch.setattr(P, "cpu_has_amx_bf16", lambda: False)
    y = CA.sdpa(q32, k32, v32, is_causal=True)
    assert called == [torch.bfloat16, torch.float32] and y.dtype == torch.float32
    CA.sdpa(q, k, v, is_causal=True)  # bf16 without AMX: the kernel sees fp32
    assert called[-1] == torch.float32
