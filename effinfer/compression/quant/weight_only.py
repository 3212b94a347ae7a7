"""Weight-only round-to-nearest quantization: int8 per output channel and int4 per group.

Kernels: on x86 CPUs, effinfer's own (`effinfer/kernels/`): int8 with integer dot products on int16
activations for few-row steps (1.5x PyTorch's at one row here); int4 on AVX512-VNNI with int8 activations per
block of 32 or 64 columns, as llama.cpp's Q4_0 x Q8_0, a GEMV for few rows (~1.3x PyTorch's); for many rows
(prefill chunks, decode batches) a GEMM for int4 and int8 alike on AVX512-VNNI (int8 activations per block of
32 columns; int4 1.16-1.36x a bf16 GEMM from 16 rows up, `benchmarks/results/many_rows.json`); else PyTorch's
packed CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) where they apply; elsewhere (CUDA)
the weight is dequantized for the call and multiplied with `F.linear`, which is also the reference the
kernels are tested against. Scales follow the activation dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from effinfer.kernels import int4_gemv, int4_layout, int4_mm, int8_gemm, int8_gemv, kernel_isa
from effinfer.layers.linear import DEQUANTIZE, QuantMethod

KERNEL_MAX_ROWS = 16
"""Above this many tokens in a step, int8 runs its GEMM (or, without one, dequantizes and runs a bf16 GEMM): its
GEMV is a GEMV at heart and falls behind on batches (`benchmarks/results/many_rows.json`). (int4's kernel
switches to its GEMM by itself.)"""


@dataclass
class Int4Blocks:
    """4-bit values with per-group affine parameters, as a checkpoint may carry them (GGUF Q4 blocks,
    GPTQ/AWQ): weight = q * scale + minimum, q in 0..15, groups of `group_size` along the input."""

    q: torch.Tensor          # [rows, cols] uint8
    scale: torch.Tensor      # [rows, cols // group_size] fp32
    minimum: torch.Tensor    # [rows, cols // group_size] fp32
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def map_rows(self, fn) -> "Int4Blocks":
        return Int4Blocks(fn(self.q), fn(self.scale), fn(self.minimum), self.group_size)

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        w = self.q.float().view(self.q.shape[0], -1, g) * self.scale[..., None] + self.minimum[..., None]
        return w.view(self.q.shape)


def min_max_params(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit scale and minimum of each group (last dimension) from its range."""
    lo, hi = groups.amin(-1), groups.amax(-1)
    return ((hi - lo) / 15).clamp(min=1e-8), lo


def as_float(weight) -> torch.Tensor:
    return weight.dequantize() if isinstance(weight, Int4Blocks) else weight.float()


class Int8WeightOnly(QuantMethod):
    """Symmetric int8 per output channel: w = q * scale[row], q in -127..127."""

    name = "int8"

    def create_weights(self, layer):
        layer.register_buffer("qweight", torch.empty(layer.out_features, layer.in_features, dtype=torch.int8))
        layer.register_buffer("scales", torch.empty(layer.out_features))

    def load_weight(self, layer, weight, row_offset):
        w = as_float(weight)
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        rows = slice(row_offset, row_offset + w.shape[0])
        layer.qweight[rows] = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        layer.scales[rows] = scale.to(layer.scales.dtype)

    def process_weights_after_loading(self, layer):
        gemv = int8_gemv() if self.cpu_kernel == "auto" and layer.qweight.device.type == "cpu" else None
        if gemv is not None and layer.in_features % 32 == 0 and layer.out_features % 4 == 0:
            layer.gemv = gemv
            layer.register_buffer("scales_fp32", layer.scales.float(), persistent=False)
            if layer.in_features % 64 == 0 and layer.out_features % 16 == 0 and int8_gemm() is not None:
                layer.gemm = int8_gemm()

    def apply(self, layer, x):
        if x.device.type == "cpu" and x.shape[0] <= KERNEL_MAX_ROWS:
            if hasattr(layer, "gemv"):
                return layer.gemv(x, layer.qweight, layer.scales_fp32)
            return torch.ops.aten._weight_int8pack_mm(x, layer.qweight, layer.scales.to(x.dtype))
        if hasattr(layer, "gemm"):
            return layer.gemm(x, layer.qweight, layer.scales_fp32)
        return F.linear(x, self.dequantize(layer).to(x.dtype))

    def dequantize(self, layer):
        return layer.qweight.to(layer.scales.dtype) * layer.scales[:, None]

    def kernels(self, layer):
        if layer.qweight.device.type != "cpu":
            return DEQUANTIZE, DEQUANTIZE
        few = f"effinfer int8_gemv ({kernel_isa()})" if hasattr(layer, "gemv") else "aten _weight_int8pack_mm"
        return few, f"effinfer int8_gemm ({kernel_isa()})" if hasattr(layer, "gemm") else DEQUANTIZE


class Int4WeightOnly(QuantMethod):
    """int4 per group of `group_size` input columns, asymmetric (scale and minimum per group) or symmetric
    (q - 8 times a scale). Loading keeps the 4-bit values one per byte; after loading they are packed
    two per byte in the CPU kernel's layout."""

    name = "int4"

    def __init__(self, group_size: int = 32, symmetric: bool = False):
        if group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size={group_size} is not supported for int4; choose 32, 64, 128 or 256")
        self.group_size, self.symmetric = group_size, symmetric
        self.kernel_block = int4_layout.block_columns(group_size)
        """Columns per activation block (and per stored scale) in effinfer's int4 kernel."""

    @classmethod
    def from_options(cls, group_size: int = 32, symmetric: bool = False) -> "Int4WeightOnly":
        return cls(group_size, symmetric)

    def describe(self):
        return {"method": self.name, "group_size": self.group_size, "symmetric": self.symmetric}

    def create_weights(self, layer):
        if layer.in_features % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide a layer's {layer.in_features} input "
                             f"features; choose a group size that does (e.g. 32 or 64)")
        groups = layer.in_features // self.group_size
        layer.register_buffer("qvalues", torch.empty(layer.out_features, layer.in_features, dtype=torch.uint8))
        layer.register_buffer("scales", torch.empty(layer.out_features, groups))
        layer.register_buffer("zeros", torch.empty(layer.out_features, groups))
        """Kernel convention: w = (q - 8) * scale + zero."""

    def quantize(self, w: torch.Tensor) -> Int4Blocks:
        """Round to nearest within each group."""
        g = w.view(w.shape[0], -1, self.group_size)
        if self.symmetric:
            scale = g.abs().amax(-1).clamp(min=1e-8) / 7
            q = torch.round(g / scale[..., None] + 8).clamp(0, 15)
            minimum = -8 * scale
        else:
            scale, minimum = min_max_params(g)
            q = torch.round((g - minimum[..., None]) / scale[..., None]).clamp(0, 15)
        return Int4Blocks(q.view(w.shape).to(torch.uint8), scale, minimum, self.group_size)

    def load_weight(self, layer, weight, row_offset):
        if not isinstance(weight, Int4Blocks) or weight.group_size != self.group_size:
            weight = self.quantize(as_float(weight))
        rows = slice(row_offset, row_offset + weight.shape[0])
        layer.qvalues[rows] = weight.q
        layer.scales[rows] = weight.scale.to(layer.scales.dtype)
        layer.zeros[rows] = (weight.minimum + 8 * weight.scale).to(layer.zeros.dtype)

    def process_weights_after_loading(self, layer):
        if layer.qvalues.device.type != "cpu" or self._pack_for_effinfer_kernel(layer):
            return    # (other devices dequantize per call)
        if layer.out_features % 16:
            return    # widths PyTorch's kernel cannot pack dequantize per call
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(layer.qvalues.to(torch.int32), 1)
        layer.register_buffer("packed", packed)
        layer.register_buffer("scales_and_zeros", torch.stack([layer.scales, layer.zeros], -1).transpose(0, 1).contiguous())
        del layer.qvalues, layer.scales, layer.zeros

    def _pack_for_effinfer_kernel(self, layer) -> bool:
        """effinfer's int4 kernel where it runs (x86 with AVX512-VNNI, not `cpu_kernel=aten`) and the shape fits."""
        gemv = int4_gemv() if self.cpu_kernel == "auto" else None
        if gemv is None or layer.in_features % 64 or layer.out_features % 4:
            return False
        scales, zeros = layer.scales.float(), layer.zeros.float()
        packed, records, _ = int4_layout.pack(layer.qvalues, scales, zeros - 8 * scales, self.group_size)
        if not records.isfinite().all():
            return False    # scales past fp16's range (not seen in real weights): PyTorch's layout keeps them
        layer.register_buffer("packed", packed)
        layer.register_buffer("records", records)
        layer.gemv = int4_mm()   # the GEMV for few rows, the GEMM for many
        del layer.qvalues, layer.scales, layer.zeros
        return True

    def apply(self, layer, x):
        if hasattr(layer, "gemv"):
            if layer.out_features % 16 == 0 or x.shape[0] <= KERNEL_MAX_ROWS:   # (the GEMM needs N % 16 == 0)
                return layer.gemv(x, layer.packed, layer.records, self.kernel_block)
            return F.linear(x, torch.ops.effinfer_kernels.int4_dequantize(layer.packed, layer.records, self.kernel_block, x.dtype))
        if hasattr(layer, "packed") and (x.shape[0] <= KERNEL_MAX_ROWS or layer.out_features % 64):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.packed, self.group_size,
                                                               layer.scales_and_zeros.to(x.dtype))
        return F.linear(x, self.dequantize(layer).to(x.dtype))

    def kernels(self, layer):
        if hasattr(layer, "gemv"):
            many = "effinfer int4_gemm" if layer.out_features % 16 == 0 else "effinfer int4_dequantize + matmul"
            return f"effinfer int4_gemv ({kernel_isa()})", f"{many} ({kernel_isa()})"
        if hasattr(layer, "packed"):
            aten = "aten _weight_int4pack_mm_for_cpu"
            return aten, aten if layer.out_features % 64 else DEQUANTIZE
        return DEQUANTIZE, DEQUANTIZE

    def dequantize(self, layer):
        if hasattr(layer, "gemv"):
            return int4_layout.dequantize(layer.packed, layer.records, self.kernel_block)
        if hasattr(layer, "packed"):
            q = unpack_int4_cpu(layer.packed, layer.out_features, layer.in_features)
            scales, zeros = layer.scales_and_zeros.unbind(-1)
            scales, zeros = scales.t(), zeros.t()
        else:
            q, scales, zeros = layer.qvalues, layer.scales, layer.zeros
        g = self.group_size
        w = (q.to(scales.dtype).view(layer.out_features, -1, g) - 8) * scales[..., None]
        return (w + zeros[..., None]).view(layer.out_features, layer.in_features)


def unpack_int4_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[n, k] 4-bit values from `_convert_weight_to_int4pack_for_cpu`'s layout, which for n a multiple
    of 64 is [n / 64, k, 32] bytes: row d of each 64-row block in the low nibble, row d + 32 in the high."""
    if n % 64:
        raise ValueError(f"no unpacking for {n} rows (a multiple of 64 is needed)")
    b = packed.view(n // 64, k, 32)
    return torch.cat([b & 0xF, b >> 4], dim=2).permute(0, 2, 1).reshape(n, k)
