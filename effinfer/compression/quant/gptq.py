"""GPTQ (Frantar et al., 2023): quantize a weight column by column and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

Output is int4 per group of `group_size` input columns (scale and minimum), the same format as
round-to-nearest int4, so the same kernels run it. With `act_order`, columns are visited in order of
decreasing Hessian diagonal (most salient first); group parameters are then fixed up front from the
original weight ("static groups"), so groups stay contiguous for the kernel. Group parameters are
each group's min..max (the reference implementation's default), or come from `group_search` (clipped
and refitted, weighted by the Hessian's diagonal, as the reference implementation's `mse` option
searches clipping), or, by default, the search only in the groups where it at least halves the
rounding error ("mixed").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effinfer.compression.quant.group_search import GROUP_FITS
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
    perplexity, sequential with act-order and searched groups; benchmarks/README.md)."""
    groups: str = "mixed"
    """How each group's scale and minimum are chosen: "minmax" (the group's range; error feedback does
    the fitting), "search" (clipping searched and refitted, weighted by the Hessian's diagonal) or
    "mixed" (the search where it at least halves the group's weighted rounding error, else min..max).
    Why mixed: the search is what brings SmolLM2 (a Q4_1 file) below llama.cpp's Q4_0, while on Qwen
    its clipping cost WikiText perplexity (on the text's " ," and <unk> tokens; benchmarks/README.md)."""

    def __post_init__(self):
        if self.groups not in GROUP_FITS:
            raise ValueError(f"GPTQ groups must be one of {', '.join(GROUP_FITS)}, got {self.groups!r}")
        if not 0 < self.damp <= 10:
            raise ValueError(f"GPTQ damp must be above 0 and at most 10 (a fraction of the Hessian's mean diagonal), got {self.damp}")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 32, act_order: bool = False,
                  damp: float = GPTQOptions.damp, groups: str = GPTQOptions.groups, block_size: int = 128
                  ) -> Int4Blocks:
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w = weight.float().clone()
    w[:, dead] = 0
    importance = torch.diag(h).float()
    fit = GROUP_FITS[groups]
    scale, minimum = fit(w, group_size, importance)     # static groups (refitted as the walk goes without act order)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(w.shape[1])
    h = h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(len(perm), dtype=h.dtype)
    # the inverse in fp64 (it is what error feedback trusts), the column walk in fp32 as the reference does
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    # transposed, so that each visited column, its group's scale and minimum are contiguous rows
    w_t, scale_t, min_t = w[:, perm].t().contiguous(), scale.t().contiguous(), minimum.t().contiguous()
    q_t = _walk_columns(w_t, h_inv, scale_t, min_t, (perm // group_size).tolist(), group_size,
                        None if act_order else (fit, importance), -(-block_size // group_size) * group_size)
    q = torch.empty_like(q_t.t())
    q[:, perm] = q_t.t()
    return Int4Blocks(q, scale_t.t().contiguous(), min_t.t().contiguous(), group_size)


def _walk_columns(w_t: torch.Tensor, h_inv: torch.Tensor, scale_t: torch.Tensor, min_t: torch.Tensor,
                  group_of: list[int], group_size: int, refit: tuple | None, block: int) -> torch.Tensor:
    """GPTQ's loop over the (permuted) columns, rows of `w_t`, updated in place: each column rounded with
    its group's scale and minimum, its error pushed onto the columns after it, in blocks of `block` columns
    (a multiple of the group size) with one matrix product per block for the columns beyond. With
    `refit` (the group fit and the columns' importance, in order), each group's parameters are fitted again
    when the walk reaches it, on its columns as updated so far."""
    cols = w_t.shape[0]
    q_t = torch.empty(w_t.shape, dtype=torch.uint8)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_block, err_block, h_block = w_t[start:end], torch.empty_like(w_t[start:end]), h_inv[start:end, start:end]
        pivots = torch.diag(h_block).tolist()
        for i in range(end - start):
            col, g = start + i, group_of[start + i]
            if refit is not None and col % group_size == 0:
                fit, importance = refit
                s, m = fit(w_block[i:i + group_size].t(), group_size, importance[col:col + group_size])
                scale_t[g], min_t[g] = s[:, 0], m[:, 0]
            q = torch.round((w_block[i] - min_t[g]) / scale_t[g]).clamp_(0, 15)
            q_t[col] = q
            err = torch.addcmul(min_t[g], q, scale_t[g]).sub_(w_block[i]).div_(-pivots[i])
            w_block[i:].addr_(h_block[i, i:], err, alpha=-1)
            err_block[i] = err
        w_t[end:] -= h_inv[start:end, end:].t() @ err_block
    return q_t


def reconstruction_error(weight: torch.Tensor, blocks: Int4Blocks, x: torch.Tensor) -> float:
    """Mean squared error of the layer's outputs on inputs `x` [n, in]."""
    return float(((x @ weight.t() - x @ blocks.dequantize().t()) ** 2).mean())
