"""GPTQ (Frantar et al., 2023): quantize a weight column by column and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Output is int4 per group of `group_size` input columns (scale and minimum), the same format as
round-to-nearest int4, so the same kernels run it. With `act_order`, columns are visited in order of
decreasing Hessian diagonal (most salient first); group parameters are then fixed up front from the
original weight ("static groups"), so groups stay contiguous for the kernel. Group parameters come
from `group_search` (clipped and refitted, weighted by the Hessian's diagonal), as the reference
implementation's `mse` option searches clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effinfer.compression.quant.group_search import group_params
from effinfer.compression.quant.weight_only import Int4Blocks


@dataclass
class GPTQOptions:
    act_order: bool = False
    """Quantize columns in order of decreasing Hessian diagonal (static groups)."""
    sequential: bool = True
    """Layer by layer, each layer's Hessian from inputs through the layers already quantized (the paper's
    order); False: every Hessian from the float model in one pass."""
    damp: float = 0.1
    """Added to the Hessian's diagonal, as a fraction of its mean: more trusts the calibration text less
    (the paper's 0.01 fitted chat calibration text too closely for WikiText on SmolLM2: 16.40 vs 16.17
    perplexity, sequential with act-order; benchmarks/README.md)."""

    def __post_init__(self):
        if not 0 < self.damp <= 10:
            raise ValueError(f"GPTQ damp must be above 0 and at most 10 (a fraction of the Hessian's mean diagonal), got {self.damp}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 32, act_order: bool = False,
                  damp: float = GPTQOptions.damp, block_size: int = 128) -> Int4Blocks:
    w = weight.double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    importance = torch.diag(h)
    scale, minimum = group_params(w, group_size, importance)    # static groups (used as is without act order too)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    group_of = perm // group_size                                # original group of each visited column
    q_all = torch.zeros(rows, cols, dtype=torch.uint8)
    dynamic = not act_order
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        w_block, err_block = w[:, start:end].clone(), torch.zeros(rows, end - start, dtype=w.dtype)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if dynamic and col % group_size == 0:   # in order: refit the group on the updated columns
                s, m = group_params(torch.cat([w_block[:, i:], w[:, end:]], 1)[:, :group_size], group_size,
                                    importance[col:col + group_size])
                scale[:, col // group_size], minimum[:, col // group_size] = s[:, 0], m[:, 0]
            g = group_of[col]
            q = torch.round((w_block[:, i] - minimum[:, g]) / scale[:, g]).clamp(0, 15)
            q_all[:, col] = q.to(torch.uint8)
            err = (w_block[:, i] - (q * scale[:, g] + minimum[:, g])) / h_block[i, i]
            w_block[:, i:] -= err[:, None] * h_block[i, i:][None, :]
            err_block[:, i] = err
        w[:, end:] -= err_block @ h_inv[start:end, end:]
    q_orig = torch.empty_like(q_all)
    q_orig[:, perm] = q_all
    return Int4Blocks(q_orig, scale.float(), minimum.float(), group_size)


def reconstruction_error(weight: torch.Tensor, blocks: Int4Blocks, x: torch.Tensor) -> float:
    """Mean squared error of the layer's outputs on inputs `x` [n, in]."""
    return float(((x @ weight.t() - x @ blocks.dequantize().t()) ** 2).mean())
