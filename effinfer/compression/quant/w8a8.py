"""W8A8: int8 weights (per output channel) and int8 activations (per token, scaled on the fly), multiplied
by an int8 GEMM with int32 accumulation (`torch._int_mm`: VNNI on this CPU, IMMA on CUDA), for batched
throughput. Few-row steps (single-stream decode) use the weight-only int8 kernel instead.

Outliers in a few activation channels make per-token int8 lossy; SmoothQuant (Xiao et al., 2023) moves
them into the weights first: s_j = max|x_j|^alpha / max|w_j|^(1 - alpha), W diag(s) and x / s, with
1/s folded into the producer of x (see `effinfer quantize --method smoothquant`).
"""

from __future__ import annotations

import torch

from effinfer.compression.quant.weight_only import KERNEL_MAX_ROWS, Int8WeightOnly


class W8A8(Int8WeightOnly):
    name = "w8a8"

    def apply(self, layer, x):
        rows = x.shape[0]
        if rows <= KERNEL_MAX_ROWS:
            return super().apply(layer, x)
        x_scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 127
        xq = torch.round(x.float() / x_scale).to(torch.int8)
        acc = torch._int_mm(xq, layer.qweight.t())
        return (acc.float() * x_scale * layer.scales.float()).to(x.dtype)

    def kernels(self, layer):
        return super().kernels(layer)[0], "torch._int_mm (int8 activations x int8 weights)"


def smooth_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale s (the layer then computes (W diag(s)) (x / s))."""
    w_max = weight.abs().amax(0).clamp(min=1e-5)
    return (act_max.clamp(min=1e-5) ** alpha / w_max ** (1 - alpha)).clamp(min=1e-5)
