"""4-bit group parameters chosen for the data, for the calibrated methods (GPTQ, AWQ): the scale and
minimum of each group that minimise its rounding error weighted by how much each input column's error
costs at the output, instead of the group's min..max (round-to-nearest's choice, kept as the plain
`int4` method)."""

from __future__ import annotations

import torch

from effinfer.compression.quant.weight_only import Int4Blocks, min_max_params

CLIP_STEPS = (0.0, 0.05, 0.1, 0.15, 0.2)
"""Fractions of a group's range that the grid search may cut off at each end."""
MIXED_KEEP_BELOW = 0.5
"""`mixed_params` takes a group's searched parameters only where they at least halve its rounding error."""


def group_params(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit scale and minimum per (row, group) of `w` [rows, cols].

    Not simply min..max: an outlier would spend the 16 levels on a range the other weights do not use.
    A grid search clips up to a fifth of the range at each end, keeping per group the pair with the
    smallest rounding error weighted by `importance` [cols] (the Hessian's diagonal: how much each input
    column's error costs at the output), then refits scale and minimum to that rounding by weighted
    least squares (as llama.cpp's k-quant search does)."""
    g = w.float().reshape(w.shape[0], -1, group_size)     # fp32: as good a search, several times faster than fp64
    weight = _column_weights(g, importance)
    lo, hi = g.amin(-1), g.amax(-1)
    best_scale, best_min, best_err = None, None, None
    for cut_lo in CLIP_STEPS:
        for cut_hi in CLIP_STEPS:
            low, high = lo + cut_lo * (hi - lo), hi - cut_hi * (hi - lo)
            scale = ((high - low) / 15).clamp(min=1e-8)
            for scale, low in ((scale, low), _least_squares(g, weight, scale, low)):
                err = _rounding_error(g, weight, scale, low)
                if best_err is None:
                    best_scale, best_min, best_err = scale, low, err
                better = err < best_err
                best_scale, best_min = torch.where(better, scale, best_scale), torch.where(better, low, best_min)
                best_err = torch.minimum(err, best_err)
    return best_scale.to(w.dtype), best_min.to(w.dtype)


def mixed_params(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None,
                 keep_below: float = MIXED_KEEP_BELOW) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's searched parameters where they cut its weighted rounding error below `keep_below` of
    min..max's (weights on a coarser grid, an outlier spending the range), else its min..max."""
    g = w.float().reshape(w.shape[0], -1, group_size)
    weight = _column_weights(g, importance)
    range_scale, range_min = min_max_params(g)
    scale, minimum = group_params(w, group_size, importance)
    searched = _rounding_error(g, weight, scale.float(), minimum.float()) < \
        keep_below * _rounding_error(g, weight, range_scale, range_min)
    return (torch.where(searched, scale.float(), range_scale).to(w.dtype),
            torch.where(searched, minimum.float(), range_min).to(w.dtype))


def range_params(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's min..max (`importance` unused: the signature of the other fits)."""
    return min_max_params(w.reshape(w.shape[0], -1, group_size))


GROUP_FITS = {"mixed": mixed_params, "minmax": range_params, "search": group_params}
"""The ways to fix a group's scale and minimum, by name (GPTQ's `groups` option)."""


def _column_weights(g: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """`importance` [cols] (or one group's [group_size]; None: uniform) laid out as the groups `g`."""
    group_size = g.shape[-1]
    weight = torch.ones(group_size, dtype=g.dtype) if importance is None else importance.to(g.dtype).clamp(min=0)
    return weight.view(1, -1, group_size).expand_as(g) if weight.numel() > group_size else weight.expand_as(g)


def _quantized(g, scale, minimum):
    return torch.round((g - minimum[..., None]) / scale[..., None]).clamp(0, 15)


def _rounding_error(g, weight, scale, minimum) -> torch.Tensor:
    return (weight * (g - (_quantized(g, scale, minimum) * scale[..., None] + minimum[..., None])) ** 2).sum(-1)


def _least_squares(g, weight, scale, minimum):
    """Scale and minimum that best fit g ~ q * scale + minimum (weighted) for the levels q that
    (scale, minimum) round to."""
    q = _quantized(g, scale, minimum)
    sw, sq, sqq = weight.sum(-1), (weight * q).sum(-1), (weight * q * q).sum(-1)
    sg, sqg = (weight * g).sum(-1), (weight * q * g).sum(-1)
    det = sw * sqq - sq * sq
    ok = det.abs() > 1e-12 * (sw * sqq).clamp(min=1e-30)
    new_scale = torch.where(ok, (sw * sqg - sq * sg) / torch.where(ok, det, 1), scale)
    new_min = torch.where(ok, (sqq * sg - sq * sqg) / torch.where(ok, det, 1), minimum)
    keep = ~ok | (new_scale <= 1e-8)
    return torch.where(keep, scale, new_scale), torch.where(keep, minimum, new_min)


def quantize_groups(w: torch.Tensor, group_size: int, importance: torch.Tensor | None = None) -> Int4Blocks:
    """Round `w` [rows, cols] to 4 bits per group with the searched scale and minimum."""
    g = w.float().view(w.shape[0], -1, group_size)
    scale, minimum = group_params(g.view(w.shape), group_size, None if importance is None else importance.float())
    return Int4Blocks(_quantized(g, scale, minimum).view(w.shape).to(torch.uint8), scale, minimum, group_size)
