"""effinfer's int8 CPU kernel (effinfer/kernels/int8_gemv.cpp): every instruction-set path this CPU can run
against the dequantize-then-matmul reference, no overflow at wide layers, the layers' choice of kernel, and
PyTorch's kernel as the fallback when the build fails."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

import effinfer.kernels as kernels
from effinfer.compression.quant import get_quant_method
from effinfer.layers.linear import QuantLinear

X86 = platform.machine().lower() in ("x86_64", "amd64")
pytestmark = pytest.mark.skipif(not X86, reason="the kernel is x86 code; elsewhere int8 uses PyTorch's")
SLOWER_PATHS = {"avx512_vnni": ["avx2", "scalar"], "avx2": ["scalar"], "scalar": []}


def _gemv():
    op = kernels.int8_gemv()
    assert op is not None, "the int8 kernel should build on an x86 machine with a C++ compiler"
    return op


def _isas() -> list[str]:
    _gemv()
    best = torch.ops.effinfer_kernels.gemv_isa()
    return ["auto", best, *SLOWER_PATHS[best]]


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])          # passes of four activation rows and a remainder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_path_matches_the_dequantized_reference(rows, dtype):
    torch.manual_seed(rows)
    n, k = 100, 96                                            # 25 tiles of 4 rows; 3 steps of 32 columns
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales = torch.rand(n) / 50
    x = torch.randn(rows, k).to(dtype)
    ref = x.double() @ (w.double() * scales.double()[:, None]).t()
    # activations are rounded to int16 per row: at most half a step of amax / 16383 per element
    bound = x.double().abs().amax(1, keepdim=True) / 16383 / 2 * (w.double().abs() * scales.double()[:, None]).sum(1)
    bound = bound + ref.abs() * torch.finfo(dtype).eps + 1e-6   # plus the output's rounding to dtype
    outputs = {isa: _gemv()(x, w, scales, isa) for isa in _isas()}
    for isa, out in outputs.items():
        assert out.dtype == dtype and out.shape == (rows, n)
        assert torch.all((out.double() - ref).abs() <= bound), isa
        assert torch.equal(out, outputs["auto"]), isa           # integer sums: every path gives the same bits


def test_wide_layers_do_not_overflow():
    """Every product at its largest: 12,288 columns would overflow the int32 lanes without chunked sums."""
    n, k = 8, 12288
    w = torch.full((n, k), 127, dtype=torch.int8)
    w[1::2] = -127
    x = torch.full((2, k), 3.0)
    scales = torch.full((n,), 0.5)
    expected = (x.double() @ (w.double() * 0.5).t()).float()
    for isa in _isas():
        assert torch.allclose(_gemv()(x, w, scales, isa), expected, rtol=1e-6), isa


def test_zero_activations_give_zeros():
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    assert torch.equal(_gemv()(torch.zeros(1, 64), w, torch.ones(8)), torch.zeros(1, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_give_nan_rows(bad):
    w = torch.randint(-127, 128, (8, 64), dtype=torch.int8)
    x = torch.randn(2, 64)
    x[1, 40] = bad
    for isa in _isas():
        out = _gemv()(x, w, torch.ones(8), isa)
        assert torch.isfinite(out[0]).all() and out[1].isnan().all(), isa


def test_bad_shapes_are_refused_with_a_message():
    w = torch.zeros(8, 48, dtype=torch.int8)                  # 48 columns: not a multiple of 32
    with pytest.raises(RuntimeError, match="K % 32"):
        _gemv()(torch.zeros(1, 48), w, torch.ones(8))
    with pytest.raises(RuntimeError, match="not supported by this CPU|isa"):
        _gemv()(torch.zeros(1, 64), torch.zeros(8, 64, dtype=torch.int8), torch.ones(8), "neon")


def _int8_layer(w: torch.Tensor, cpu_kernel: str) -> QuantLinear:
    method = get_quant_method("int8")
    method.cpu_kernel = cpu_kernel
    layer = QuantLinear(w.shape[1], w.shape[0], False, method).to(torch.bfloat16)
    layer.load_weight(w)
    method.process_weights_after_loading(layer)
    return layer


def test_int8_layers_use_the_kernel_unless_told_otherwise():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    ours, aten = _int8_layer(w, "auto"), _int8_layer(w, "aten")
    assert hasattr(ours, "gemv") and not hasattr(aten, "gemv") and not hasattr(aten, "gemm")
    for rows in (2, 40):   # the GEMV, then the GEMM where the CPU has one (else dequantize + GEMM)
        x = torch.randn(rows, 128).bfloat16()
        ref = F.linear(x.float(), ours.method.dequantize(ours).float())
        for layer in (ours, aten):
            assert torch.allclose(layer(x).float(), ref, atol=0.02 * ref.abs().max().item())


def _gemm():
    _gemv()
    if kernels.int8_gemm() is None:
        pytest.skip("the int8 GEMM needs AVX512-VNNI (this CPU dequantizes for many-row steps)")
    return kernels.int8_gemm()


@pytest.mark.parametrize("rows", [1, 3, 17, 33])            # passes of four activation rows and a remainder
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gemm_matches_a_reference_that_rounds_activations_alike(rows, dtype):
    """Many-row steps: activations rounded to int8 per block of 32 columns, the weights' own int8 values."""
    from tests.compression.test_int4_gemv import _round_activations

    for n, k in [(48, 576), (32, 1536), (16, 64)]:   # tiles of 32 rows and one of 16; a 64-column tail
        g = torch.Generator().manual_seed(rows + n)
        q, scales = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8), torch.rand(n, generator=g) / 50
        weight = q.double() * scales.double()[:, None]
        x = torch.randn(rows, k, generator=g).to(dtype)
        rounded, step = _round_activations(x, 32)
        exact = x.double() @ weight.t()
        slack = (x.double().abs() @ weight.abs().t()) * 1e-5 + exact.abs() * torch.finfo(dtype).eps + 1e-6
        out = _gemm()(x, q, scales).double()
        assert out.shape == (rows, n)
        assert torch.all((out - rounded.double() @ weight.t()).abs() <= slack), (n, k)
        assert torch.all((out - exact).abs() <= (step.double() / 2) @ weight.abs().t() + slack), (n, k)
    q, scales = torch.randint(-127, 128, (16, 64), dtype=torch.int8), torch.rand(16)
    x = torch.randn(9, 64)
    x[4, 10] = float("nan")
    out = _gemm()(x, q, scales)
    assert out[4].isnan().all() and torch.isfinite(out[torch.arange(9) != 4]).all()
    with pytest.raises(RuntimeError, match="N % 16"):
        _gemm()(torch.zeros(20, 64), q[:12], scales[:12])


def test_a_failed_build_falls_back_to_pytorch_with_a_warning(failed_kernel_build):
    with pytest.warns(UserWarning, match="did not build .*no C\\+\\+ compiler.*PyTorch's kernel"):
        assert kernels.int8_gemv() is None
    layer = _int8_layer(torch.randn(64, 128), "auto")
    assert not hasattr(layer, "gemv")
    assert layer(torch.randn(1, 128).bfloat16()).shape == (1, 64)
