"""The bf16 cast-once inference path (qlip.model.precision, qlip.load(precision=), --precision)."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import qlip
from qlip.cli import main
from qlip.errors import ConfigError, QLIPError
from qlip.model import precision as P
from qlip.nn import precision as DP  # the device choice (monkeypatched there)

# measured (docs/performance.md): qlip-tiny 99.79 %, official eva 99.63 %, clip 99.79 % of id bits
MIN_BIT_AGREEMENT = 0.99


def bit_agreement(model, a, b):
    bits = model.quantizer.ids_to_bits
    return (bits(a) == bits(b)).double().mean().item()


def load_pair(name, **kw):
    torch.manual_seed(0)
    ref = qlip.load(name, **kw)
    torch.manual_seed(0)
    bf = qlip.load(name, precision="bf16", **kw)
    return ref, bf


@pytest.fixture(scope="module")
def tiny_pair():
    return load_pair("qlip-tiny", pretrained=False)


def test_resolve_precision(monkeypatch):
    assert P.resolve_precision("fp32").name == "fp32" and P.resolve_precision(None).name == "fp32"
    assert P.resolve_precision("bf16", "cpu").name == "bf16"
    with pytest.raises(ConfigError, match="precision must be one of"):
        P.resolve_precision("fp16")
    monkeypatch.setattr(DP, "cpu_has_amx_bf16", lambda: True)
    assert DP.resolve_precision("auto", "cpu") == P.PrecisionChoice("bf16", "auto: CPU with AMX (amx_bf16)")
    monkeypatch.setattr(DP, "cpu_has_amx_bf16", lambda: False)
    # without AMX the avx512_bf16 flag alone does not decide: the measured matmul speed-up does
    measured = []
    monkeypatch.setattr(DP, "cpu_bf16_matmul_speedup", lambda: measured.append(1) or speed)
    for flags, speed, expected, words in ((frozenset({"avx2"}), 3.0, "fp32", "without AMX or avx512_bf16"),
                                          (frozenset({"avx512_bf16"}), 0.53, "fp32", "measured only 0.53x"),
                                          (frozenset({"avx512_bf16"}), 1.49, "fp32", "measured only 1.49x"),
                                          (frozenset({"avx512_bf16"}), 2.3, "bf16", "measured 2.3x fp32")):
        monkeypatch.setattr(DP, "cpu_flags", lambda: flags)
        choice = DP.resolve_precision("auto", "cpu")
        assert choice.name == expected and words in choice.reason, (flags, speed, choice)
    assert len(measured) == 3  # never measured on a CPU without the flag (bf16 runs reference kernels there)


def test_auto_on_this_machine_follows_proc_cpuinfo_and_the_measured_matmul():
    with open("/proc/cpuinfo") as f:
        flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    assert P.cpu_has_amx_bf16() == ("amx_bf16" in flags)
    if "amx_bf16" in flags:
        expected = "bf16"
    elif "avx512_bf16" in flags:
        expected = "bf16" if DP.cpu_bf16_matmul_speedup() >= DP.BF16_MIN_SPEEDUP else "fp32"
    else:
        expected = "fp32"
    assert P.resolve_precision("auto", "cpu").name == expected


def test_bf16_matmul_speedup_is_a_cached_positive_ratio():
    s = DP.cpu_bf16_matmul_speedup()
    assert s > 0 and DP.cpu_bf16_matmul_speedup() == s  # measured once per process


def test_weights_cast_once_sign_projection_kept_exact(tiny_pair):
    ref, bf = tiny_pair
    assert bf.precision_choice.name == "bf16" and ref.precision_choice is None
    for name, p in bf.named_parameters():
        want = torch.float32 if name.startswith("bottleneck.down.") else torch.bfloat16
        assert p.dtype == want, name
    # the fp32 module was never rounded to bf16 and back
    for (n, a), (_, b) in zip(ref.bottleneck.down.named_parameters(), bf.bottleneck.down.named_parameters()):
        assert torch.equal(a, b), n
    assert bf.decoder.rope is None or bf.decoder.rope.cos.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="either dtype or precision"):
        qlip.load("qlip-tiny", pretrained=False, dtype=torch.float64, precision="bf16")


class WeightCopies(TorchDispatchMode):
    """Counts ops that make a converted copy of one of the given parameters (``p.to(dtype)`` with
    another dtype, ``_to_copy``, ``copy_`` from it)."""

    def __init__(self, params):
        super().__init__()
        self.ptrs = {p.data_ptr() for p in params}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        src = args[1] if func is torch.ops.aten.copy_.default else (args[0] if args else None)
        if (func.overloadpacket in (torch.ops.aten.to, torch.ops.aten._to_copy, torch.ops.aten.copy_)
                and isinstance(src, torch.Tensor) and src.data_ptr() in self.ptrs
                and isinstance(out, torch.Tensor) and out.data_ptr() != src.data_ptr()):
            self.count += 1
        return out


def test_no_weight_is_recast_per_call(tiny_pair):
    ref, bf = tiny_pair
    x = torch.randn(2, 3, ref.image_size, ref.image_size)
    with torch.inference_mode(), WeightCopies(list(bf.parameters())) as seen:
        bf.detokenize(bf.tokenize(x))
        bf.reconstruct(x)
    assert seen.count == 0
    # the detector works: a plain model.to(bfloat16) re-casts the pre-sign projection's bf16
    # weights to fp32 at every call (4 tensors: fc and proj weights and biases)
    plain = copy.deepcopy(ref).to(torch.bfloat16)
    with torch.inference_mode(), WeightCopies(list(plain.parameters())) as seen:
        plain.tokenize(x)
    assert seen.count == 4


def test_ids_agree_with_fp32_tiny(tiny_pair):
    ref, bf = tiny_pair
    x = torch.randn(64, 3, ref.image_size, ref.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ids32, ids16 = ref.tokenize(x), bf.tokenize(x)
        agree = bit_agreement(ref, ids16, ids32)
        assert MIN_BIT_AGREEMENT <= agree < 1.0  # bf16 does change a few bits: the path really is bf16
        # detokenizing the same ids: close to fp32 (relative RMS error of the normalised pixels)
        y32, y16 = ref.detokenize(ids32), bf.detokenize(ids32)
        assert y16.dtype == torch.bfloat16
        rel = ((y16.float() - y32).pow(2).mean().sqrt() / y32.pow(2).mean().sqrt()).item()
        assert rel < 0.02
        # reconstruct == detokenize(tokenize) in bf16 too
        assert torch.allclose(bf.reconstruct(x[:4]).float(), bf.detokenize(ids16[:4]).float(), atol=0.05)


@pytest.mark.parametrize("variant", ["eva", "clip"])
def test_ids_agree_with_fp32_official_tiny(fixtures_dir, variant):
    ref, bf = load_pair(str(fixtures_dir / variant))
    ref_npz = np.load(fixtures_dir / variant / "reference_fp32.npz")
    x = torch.cat([torch.from_numpy(ref_npz["input_pixel_values"]),
                   torch.randn(62, 3, 32, 32, generator=torch.Generator().manual_seed(2))])
    with torch.inference_mode():
        ids32, ids16 = ref.tokenize(x), bf.tokenize(x)
    assert torch.equal(ids32[:2].flatten(1), torch.from_numpy(ref_npz["indices"]))
    assert bit_agreement(ref, ids16, ids32) >= MIN_BIT_AGREEMENT


def test_non_finite_projection_is_an_error(tiny_pair):
    ref, _ = tiny_pair
    x = torch.zeros(1, 3, ref.image_size, ref.image_size)
    x[0, 0, 0, 0] = float("nan")
    with torch.inference_mode(), pytest.raises(QLIPError, match="non-finite"):
        ref.tokenize(x)


@pytest.fixture
def core_cli(monkeypatch):
    """The core commands only: downstream areas other sessions are writing do not matter here."""
    monkeypatch.setattr("qlip.cli.DOWNSTREAM_AREAS", ())


def test_cli_precision(tmp_path, capsys, core_cli):
    rs = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rs.randint(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    m = ["--model", "qlip-tiny", "--random-init", "--workers", "0"]
    assert main(["tokenize", str(tmp_path), *m, "-q", "-o", str(tmp_path / "a.npy")]) == 0
    assert main(["tokenize", str(tmp_path), *m, "--precision", "bf16", "-o", str(tmp_path / "b.npy")]) == 0
    err = capsys.readouterr().err
    assert "qlip: precision bf16 (asked for)" in err
    assert main(["tokenize", str(tmp_path), *m, "--precision", "auto", "-o", str(tmp_path / "c.npy")]) == 0
    auto = P.resolve_precision("auto", "cpu")
    assert f"qlip: precision {auto}" in capsys.readouterr().err
    a, b = (torch.from_numpy(np.load(tmp_path / f)) for f in ("a.npy", "b.npy"))
    model = qlip.load("qlip-tiny", pretrained=False)
    assert bit_agreement(model, b, a) >= 0.97  # 3 images x 16 tokens x 28 bits: a small sample
    assert main(["tokenize", str(tmp_path), *m, "--precision", "bf16", "--bf16", "-o", str(tmp_path / "d.npy")]) == 2
    assert "cannot be combined" in capsys.readouterr().err
