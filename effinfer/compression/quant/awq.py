"""AWQ (Lin et al., 2024): protect the weights that meet large activations by scaling input channels.

For a linear layer with inputs x, a per-channel scale s turns W x into (W diag(s)) (x / s): the
channels with large mean |x| get larger weights, hence relatively finer 4-bit steps. s = mean|x|^alpha,
with alpha searched on a grid to minimise the layer's output error on calibration rows; then each
group's range is clipped where that lowers its input-weighted rounding error. The 1/s is
folded into the operation that produces x, so inference costs nothing extra:

- q/k/v: the input norm's weight; gate/up: the MLP's input norm; down: the rows of `up` (the product
  act(gate) * up is linear in up); o_proj: the rows of `v` when there is one query head per KV head
  (otherwise o_proj is left at round-to-nearest, as AutoAWQ does).
"""

from __future__ import annotations

import torch

from effinfer.compression.quant.group_search import quantize_groups
from effinfer.compression.quant.weight_only import Int4Blocks, Int4WeightOnly

GRID = 20


def search_scale(weight: torch.Tensor, mean_abs: torch.Tensor, x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, float]:
    """The input-channel scale s (and its alpha) that minimises ||x W^T - (x / s) Q(W s)^T||^2."""
    rtn = Int4WeightOnly(group_size)
    reference = x @ weight.t()
    best, best_s, best_alpha = float("inf"), torch.ones_like(mean_abs), 0.0
    for step in range(GRID + 1):
        alpha = step / GRID
        s = mean_abs.clamp(min=1e-4) ** alpha
        s = s / (s.max() * s.min()).sqrt()
        q = rtn.quantize(weight * s[None, :]).dequantize()
        err = float(((reference - (x / s) @ q.t()) ** 2).mean())
        if err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha


def awq_quantize(weight: torch.Tensor, scale: torch.Tensor, group_size: int, input_sq_sum: torch.Tensor) -> Int4Blocks:
    """Int4 of the scaled weight W diag(s), each group's range clipped for the inputs it meets, x / s
    (AWQ's clip search; `input_sq_sum`: sum of x_j^2 per input channel)."""
    return quantize_groups(weight * scale[None, :], group_size, importance=input_sq_sum / scale ** 2)
