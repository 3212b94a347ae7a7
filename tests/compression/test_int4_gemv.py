"""effinfer's int4 CPU kernel (effinfer/kernels/int4_gemv.cpp): its layout round trip, every path this CPU can
run against a reference that rounds the activations the same way (int8 per block) and against the exact
product within that rounding's bound, the layers' choice of kernel, and PyTorch's kernel as the fallback."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

import effinfer.kernels as kernels
from effinfer.compression.quant import get_quant_method
from effinfer.kernels import int4_layout
from effinfer.layers.linear import QuantLinear

X86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(not X86, reason="the kernel is x86 code; elsewhere int4 uses PyTorch's")

# widths: chunks of 128 only, chunks and a 64-column tail (SmolLM2's 576), a tail alone; each group size that fits
CASES = [(n, k, g) for n, k in [(8, 640), (12, 576), (4, 64)] for g in (32, 64, 128) if k % g == 0]


def _op():
    assert kernels._loaded(), "the CPU kernels should build on an x86 machine with a C++ compiler"
    return torch.ops.effinfer_kernels.int4_gemv.default


def _isas() -> list[str]:
    _op()
    return ["auto", "scalar"] if torch.ops.effinfer_kernels.int4_isa() == "avx512_vnni" else ["scalar"]


def _random_weight(n: int, k: int, group_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, k // group_size, generator=g) / 20 + 1e-3
    minimum = -8 * scale + torch.randn(n, k // group_size, generator=g) / 50
    return q, scale, minimum


def _round_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel multiplies with: x rounded to int8 per block of columns (scale = amax / 127), and
    each element's scale."""
    blocks = x.double().view(x.shape[0], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    # fp32 arithmetic rounded as IEEE says (from float64, where these products and quotients are exact enough):
    # PyTorch's own fp32 kernels may be an ulp off, which flips ties of the rounding to int8
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax)).float().double()
    scale = (amax / 127).float().double()
    rounded = torch.round((blocks * inv).float().double()) * scale
    return rounded.view(x.shape), scale.expand_as(blocks).reshape(x.shape)


def test_layout_round_trip():
    """Packing keeps every 4-bit value and (fp16-rounded) scale and minimum in place, for all group sizes."""
    for n, k, group_size in CASES:
        q, scale, minimum = _random_weight(n, k, group_size, seed=k + group_size)
        packed, records, block = int4_layout.pack(q, scale, minimum, group_size)
        assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
        assert records.shape == (n, 2 * k // block) and records.dtype == torch.float16
        s16, m16 = scale.half().float(), minimum.half().float()
        expected = q.float().view(n, -1, group_size) * s16[..., None] + m16[..., None]
        assert torch.equal(int4_layout.dequantize(packed, records, block), expected.view(n, k))
        if kernels.int4_gemv() is not None:   # the C++ unpacking for many-row steps gives the same weights
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                fast = torch.ops.effinfer_kernels.int4_dequantize(packed, records, block, dtype)
                assert torch.equal(fast, expected.view(n, k).to(dtype)), (k, group_size, dtype)


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])          # passes of four activation rows and a remainder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_path_matches_the_reference(rows, dtype):
    for n, k, group_size in CASES:
        q, scale, minimum = _random_weight(n, k, group_size, seed=rows + k)
        packed, records, block = int4_layout.pack(q, scale, minimum, group_size)
        weight = int4_layout.dequantize(packed, records, block).double()
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        rounded, step = _round_activations(x, block)
        same_rounding = rounded.double() @ weight.t()
        exact = x.double() @ weight.t()
        # int8 rounding: at most half a step per element; plus fp32 sums and the output's rounding to dtype
        bound = (step.double() / 2) @ weight.abs().t()
        slack = (x.double().abs() @ weight.abs().t()) * 1e-5 + exact.abs() * torch.finfo(dtype).eps + 1e-6
        for isa in _isas():
            out = _op()(x, packed, records, block, isa).double()
            assert out.shape == (rows, n), isa
            assert torch.all((out - same_rounding).abs() <= slack), (isa, k, group_size)
            assert torch.all((out - exact).abs() <= bound + slack), (isa, k, group_size)


# the GEMM: weight rows in tiles of 32 (and a last tile of 16), every row width above
GEMM_CASES = [(n, k, g) for n, k in [(48, 640), (32, 576), (16, 64)] for g in (32, 64, 128) if k % g == 0]


def _gemm():
    _op()
    if torch.ops.effinfer_kernels.int4_isa() != "avx512_vnni":
        pytest.skip("the GEMM needs AVX512-VNNI (this CPU runs int4 through PyTorch's kernel)")
    return torch.ops.effinfer_kernels.int4_gemm.default


@pytest.mark.parametrize("rows", [1, 3, 9, 17, 33])         # passes of four activation rows and a remainder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gemm_matches_the_reference(rows, dtype):
    """Many-row steps: the same rounding of the activations as the GEMV, the same sums in another order."""
    for n, k, group_size in GEMM_CASES:
        q, scale, minimum = _random_weight(n, k, group_size, seed=rows + k + n)
        packed, records, block = int4_layout.pack(q, scale, minimum, group_size)
        weight = int4_layout.dequantize(packed, records, block).double()
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
        rounded, _ = _round_activations(x, block)
        slack = (x.double().abs() @ weight.abs().t()) * 1e-5 + (x.double() @ weight.t()).abs() * torch.finfo(dtype).eps + 1e-6
        out = _gemm()(x, packed, records, block).double()
        assert out.shape == (rows, n)
        assert torch.all((out - rounded.double() @ weight.t()).abs() <= slack), (k, group_size)


def test_the_layers_op_takes_the_gemv_for_few_rows_and_the_gemm_for_many():
    mm, gemm = torch.ops.effinfer_kernels.int4_mm.default, _gemm()
    for n, rows, expected in [(32, 8, "gemv"), (32, 9, "gemm"), (32, 64, "gemm"), (12, 40, "gemv")]:
        q, scale, minimum = _random_weight(n, 576, 32, seed=rows)
        packed, records, block = int4_layout.pack(q, scale, minimum, 32)
        x = torch.randn(rows, 576)
        by = {"gemv": lambda: _op()(x, packed, records, block), "gemm": lambda: gemm(x, packed, records, block)}
        assert torch.equal(mm(x, packed, records, block), by[expected]()), (n, rows)
        other = "gemv" if expected == "gemm" and n % 16 == 0 else None
        if other is not None:   # the two orders of summation differ: the test can tell them apart
            assert not torch.equal(by[other](), by[expected]())


def test_zero_activations_give_zeros_and_non_finite_rows_give_nan():
    q, scale, minimum = _random_weight(8, 576, 64, seed=0)
    packed, records, block = int4_layout.pack(q, scale, minimum, 64)
    for isa in _isas():
        assert torch.equal(_op()(torch.zeros(2, 576), packed, records, block, isa), torch.zeros(2, 8))
        for bad in (float("nan"), float("inf")):
            x = torch.randn(2, 576)
            x[1, 300] = bad
            out = _op()(x, packed, records, block, isa)
            assert torch.isfinite(out[0]).all() and out[1].isnan().all(), isa
    if torch.ops.effinfer_kernels.int4_isa() == "avx512_vnni":   # the GEMM too
        q, scale, minimum = _random_weight(16, 576, 64, seed=0)
        packed, records, block = int4_layout.pack(q, scale, minimum, 64)
        x = torch.randn(10, 576)
        x[7, 3] = float("inf")
        out = _gemm()(x, packed, records, block)
        assert torch.isfinite(out[torch.arange(10) != 7]).all() and out[7].isnan().all()
        assert torch.equal(_gemm()(torch.zeros(10, 576), packed, records, block), torch.zeros(10, 16))


def test_bad_shapes_are_refused_with_a_message():
    q, scale, minimum = _random_weight(8, 128, 64, seed=0)
    packed, records, block = int4_layout.pack(q, scale, minimum, 64)
    with pytest.raises(RuntimeError, match="K % 64"):
        _op()(torch.zeros(1, 96), torch.zeros(8, 48, dtype=torch.uint8), torch.zeros(8, 3, dtype=torch.half), 64)
    with pytest.raises(RuntimeError, match="fp16 records"):
        _op()(torch.zeros(1, 128), packed, records.float(), block)
    with pytest.raises(RuntimeError, match="blocks of 32 or 64"):
        _op()(torch.zeros(1, 128), packed, records, 128)
    if torch.ops.effinfer_kernels.int4_isa() == "avx512_vnni":
        with pytest.raises(RuntimeError, match="N % 16"):
            _gemm()(torch.zeros(9, 128), packed, records, block)
    with pytest.raises(RuntimeError, match="not supported by this CPU|isa"):
        _op()(torch.zeros(1, 128), packed, records, block, "neon")
    with pytest.raises(ValueError, match="multiple of 64 columns"):
        int4_layout.pack(torch.zeros(4, 96, dtype=torch.uint8), torch.ones(4, 3), torch.zeros(4, 3), 32)


def _int4_layer(w: torch.Tensor, cpu_kernel: str, group_size: int = 64) -> QuantLinear:
    method = get_quant_method("int4", group_size)
    method.cpu_kernel = cpu_kernel
    layer = QuantLinear(w.shape[1], w.shape[0], False, method).to(torch.bfloat16)
    layer.load_weight(w)
    method.process_weights_after_loading(layer)
    return layer


def test_int4_layers_use_the_kernel_unless_told_otherwise():
    torch.manual_seed(0)
    w = torch.randn(64, 576)
    ours, aten = _int4_layer(w, "auto"), _int4_layer(w, "aten")
    if kernels.int4_gemv() is None:
        pytest.skip("this CPU has no AVX512-VNNI: int4 layers keep PyTorch's kernel")
    assert hasattr(ours, "gemv") and not hasattr(ours, "qvalues") and not hasattr(aten, "gemv")
    assert ours.packed.numel() == w.numel() // 2 and ours.records.dtype == torch.float16   # 4.5 bits per weight
    # the same weights on both layouts (up to fp16 vs bf16 scales; PyTorch's dequantizes to bf16)
    assert torch.allclose(ours.method.dequantize(ours), aten.method.dequantize(aten).float(), rtol=1e-2, atol=1e-2)
    for rows in (2, 40):                                        # the kernel; dequantize + GEMM
        x = torch.randn(rows, 576).bfloat16()
        ref = F.linear(x.float(), ours.method.dequantize(ours))
        for layer in (ours, aten):
            assert torch.allclose(layer(x).float(), ref, atol=0.03 * ref.abs().max().item())


def test_a_failed_build_keeps_pytorchs_int4_kernel(failed_kernel_build):
    with pytest.warns(UserWarning, match="did not build"):
        assert kernels.int4_gemv() is None
    layer = _int4_layer(torch.randn(64, 128), "auto")
    assert not hasattr(layer, "gemv") and hasattr(layer, "scales_and_zeros")
    assert layer(torch.randn(1, 128).bfloat16()).shape == (1, 64)
