"""Weight quantization: kernels against the dequantize-then-matmul reference, GGUF blocks repacked
exactly, and real-model quality and memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from effinfer.compression.quant import QUANT_METHODS, get_quant_method
from effinfer.compression.quant.gguf_blocks import to_int4_blocks
from effinfer.compression.quant.weight_only import Int4Blocks
from effinfer.layers.linear import QuantLinear


def _layer(method, weight, dtype=torch.float32, bias=None):
    layer = QuantLinear(weight.shape[1], weight.shape[0], bias is not None, method).to(dtype)
    if bias is not None:
        layer.bias.data.copy_(bias)
    half = weight.shape[0] // 2        # two shards, as a fused q/k/v or gate/up layer receives them
    layer.load_weight(weight[:half], 0)
    layer.load_weight(weight[half:], half)
    method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 40])        # 40 rows: the int8 layer's GEMM (or dequantize-and-GEMM) path
def test_int8_kernel_matches_reference(dtype, rows):
    torch.manual_seed(0)
    w, x, b = torch.randn(96, 128), torch.randn(rows, 128).to(dtype), torch.randn(96)
    layer = _layer(get_quant_method("int8"), w, dtype, b)
    ref = F.linear(x.float(), layer.method.dequantize(layer).float(), b)
    # fp32: few-row steps round activations to int16 in effinfer's kernel, its GEMM to int8 per 32 columns (their
    # own tests bound that exactly)
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.02 if hasattr(layer, "gemm") and rows > 16 else 1e-3
    assert torch.allclose(layer(x).float(), ref, atol=tolerance * ref.abs().max().item())
    # per-row error of round-to-nearest is at most half a step of that row's scale (plus bf16 rounding)
    err = (layer.method.dequantize(layer).float() - w).abs().amax(dim=1)
    amax = w.abs().amax(dim=1)
    assert torch.all(err <= amax / 127 / 2 * 1.01 + (amax / 128 if dtype == torch.bfloat16 else 0))


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("cpu_kernel", ["aten", "auto"])      # PyTorch's kernel; effinfer's where it runs
def test_int4_kernel_matches_reference(group_size, symmetric, cpu_kernel):
    torch.manual_seed(1)
    w, x = torch.randn(128, 256), torch.randn(3, 256)
    method = get_quant_method("int4", group_size, symmetric)
    method.cpu_kernel = cpu_kernel
    blocks = method.quantize(w)
    reference = blocks.dequantize()
    assert (reference - w).abs().max() <= blocks.scale.max() * 0.51          # round to nearest
    if symmetric:
        assert torch.equal(blocks.minimum, -8 * blocks.scale)
    layer = _layer(method, w)
    assert hasattr(layer, "packed") and not hasattr(layer, "qvalues")         # packed: one byte per two values
    assert layer.packed.numel() == w.numel() // 2
    if hasattr(layer, "gemv"):   # effinfer's: fp16 scales, activations rounded to int8 per block of 64 (or 32)
        assert torch.all((method.dequantize(layer) - reference).abs() <= _fp16_rounding_bound(blocks))
        few = F.linear(x, method.dequantize(layer))
        assert torch.allclose(layer(x), few, atol=0.02 * few.abs().max().item())
    else:
        assert torch.allclose(layer(x), F.linear(x, reference), atol=1e-3)
        assert torch.allclose(method.dequantize(layer), reference, atol=1e-5)   # unpacked from the kernel layout
    many = torch.randn(40, 256)
    expected = F.linear(many, method.dequantize(layer))
    if hasattr(layer, "gemv"):   # effinfer's GEMM: activations rounded as for few rows
        assert torch.allclose(layer(many), expected, atol=0.02 * expected.abs().max().item())
    else:                        # dequantize and GEMM
        assert torch.allclose(layer(many), expected, atol=1e-3)


def _fp16_rounding_bound(blocks: Int4Blocks) -> torch.Tensor:
    """How far q * scale + minimum moves when scale and minimum are rounded to fp16 (half an ulp each)."""
    per_group = (15 * blocks.scale.abs() + blocks.minimum.abs()) * 2 ** -11 + 1e-6
    return per_group.repeat_interleave(blocks.group_size, dim=1)


def test_int4_rejects_a_group_that_does_not_divide_the_width():
    with pytest.raises(ValueError, match="does not divide a layer's 576 input features"):
        QuantLinear(576, 64, False, get_quant_method("int4", 128))


def _random_blocks(qtype, rows, cols, seed=0):
    """Random bytes are valid 4-bit blocks once their fp16 scales are finite and small."""
    rng = np.random.default_rng(seed)
    block_elems, block_bytes = (256, 144) if qtype == T.Q4_K else (32, 20 if qtype == T.Q4_1 else 18)
    blocks = rng.integers(0, 256, size=(rows * cols // block_elems, block_bytes), dtype=np.uint8)
    num_scales = 2 if qtype in (T.Q4_1, T.Q4_K) else 1
    scales = rng.uniform(0.001, 0.05, size=(blocks.shape[0], num_scales)).astype(np.float16)
    blocks[:, :2 * num_scales] = scales.view(np.uint8)
    return blocks


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q4_K])
def test_gguf_4bit_blocks_repack_exactly(qtype):
    rows, cols = 16, 512
    data = _random_blocks(qtype, rows, cols)
    expected = torch.from_numpy(dequantize(data, qtype).reshape(rows, cols))
    blocks = to_int4_blocks(data, qtype, rows, cols)
    assert blocks.q.max() <= 15 and blocks.group_size == 32
    assert torch.allclose(blocks.dequantize(), expected, atol=1e-6, rtol=0)
    x = torch.randn(2, cols)
    for cpu_kernel in ("aten", "auto"):
        method = get_quant_method("int4", 32)
        method.cpu_kernel = cpu_kernel
        layer_blocks = QuantLinear(cols, rows, False, method)
        layer_blocks.load_weight(blocks, 0)                                 # no rounding on the way
        method.process_weights_after_loading(layer_blocks)
        if hasattr(layer_blocks, "gemv"):   # effinfer's kernel: scales in fp16 (exact for Q4_0 / Q4_1's own)
            assert torch.all((method.dequantize(layer_blocks) - expected).abs() <= _fp16_rounding_bound(blocks))
        else:
            assert torch.allclose(layer_blocks(x), x @ expected.t(), atol=1e-4)


def test_int4_blocks_keep_rows_together_when_permuted():
    blocks = Int4Blocks(torch.arange(8 * 64).reshape(8, 64).remainder(16).to(torch.uint8),
                        torch.rand(8, 2), torch.rand(8, 2), 32)
    flipped = blocks.map_rows(lambda t: t.flip(0))
    assert torch.equal(flipped.dequantize(), blocks.dequantize().flip(0))


def test_w8a8_int8_gemm_matches_reference():
    torch.manual_seed(3)
    w, x = torch.randn(96, 128), torch.randn(40, 128)          # 40 rows: the int8 x int8 GEMM path
    layer = _layer(get_quant_method("w8a8"), w)
    reference = F.linear(x, layer.method.dequantize(layer))
    out = layer(x)
    # activations rounded per token: error within a few int8 steps of the output's size
    assert (out - reference).abs().max() < 0.02 * reference.abs().max()
    few = F.linear(x[:3], layer.method.dequantize(layer))                      # the int8 weight-only kernel
    assert torch.allclose(layer(x[:3]), few, atol=1e-3 * few.abs().max().item())


@pytest.mark.parametrize("name", sorted(QUANT_METHODS))
@pytest.mark.parametrize("rows", [1, 40])
def test_every_registered_method_computes_with_its_own_weights(name, rows):
    """Any method in the table: a layer built from the config's options computes x @ dequantize().T (the
    oracle) and its weights stay within 5% of the float ones (4-bit groups of 32 or 8-bit rows)."""
    torch.manual_seed(3)
    w, x = torch.randn(64, 128), torch.randn(rows, 128)
    layer = _layer(get_quant_method(name, 32), w)
    dense = layer.method.dequantize(layer).float()
    assert dense.shape == w.shape
    assert (dense - w).norm() <= 0.15 * w.norm()
    ref = F.linear(x, dense)
    assert torch.allclose(layer(x).float(), ref, atol=0.02 * ref.abs().max().item())
