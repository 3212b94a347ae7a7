"""Pruning, registered by name in `PRUNE_METHODS`: `prune_model(model, method, sparsity, calibration) -> report`
runs on a loaded float model; a method that needs activations gets them by running calibration windows
through the model (`Calibration.score`, the engine's).

- magnitude: zero the smallest |w| of each output row (unstructured, any sparsity);
- wanda: zero the smallest |w| * ||x_j|| per output row, x_j the layer's input channel norms on
  calibration text (Sun et al., 2024: no weight update);
- 2:4: in every 4 consecutive input weights keep the 2 with the largest Wanda score (semi-structured;
  PyTorch's 2:4 kernels are CUDA-only, so on CPU it is a quality measurement, not a speed-up);
- layers: remove whole decoder layers with the lowest block influence, 1 - cos(input, output) of the
  layer on calibration text (ShortGPT; Men et al., 2024): fewer layers, less compute and KV memory;
- mlp_channels: remove the MLP's intermediate channels with the smallest Wanda-style importance,
  shrinking gate/up rows and down columns: smaller matrices, really faster.

Unstructured zeros (magnitude, wanda, 2:4) leave the matrices dense: they save nothing on CPU without
a sparse kernel; they are here to be measured for quality, as the literature reports them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the table is read by configs and the CLI, which import no torch; the math is in ops.py
    import torch
    from torch import nn


@dataclass
class Calibration:
    """Calibration text, cut into windows, and the way to run one through the model being pruned."""

    windows: list[list[int]]
    score: Callable[[list[int]], object]
    show_progress: bool = True


class PruneMethod:
    """One pruning method: `prune` changes the model in place and reports what it removed."""

    name: str = ""
    needs_calibration: bool = True
    """Whether `prune` needs activations (a `Calibration`)."""
    structured: bool = False
    """Whether it changes shapes (layers, channels) rather than zeroing weights in dense matrices."""

    def prune(self, model: nn.Module, sparsity: float, calibration: Calibration | None) -> dict:
        linears = _ops().float_linears(model)
        stats = _ops().input_stats(model, calibration) if self.needs_calibration else None
        zeroed = total = 0
        for name, linear in linears.items():
            w = linear.weight.data
            mask = self.mask(w.abs().float(), stats[name].sq_sum if stats else None, sparsity)
            w.mul_(mask.to(w.dtype))
            zeroed += int((~mask).sum())
            total += mask.numel()
        return {"method": self.name, "sparsity": zeroed / total, "zeroed_weights": zeroed}

    def mask(self, magnitude: torch.Tensor, input_sq_sum: torch.Tensor | None, sparsity: float) -> torch.Tensor:
        """[out, in] True where a weight stays."""
        raise NotImplementedError


class MagnitudePrune(PruneMethod):
    name, needs_calibration = "magnitude", False

    def mask(self, magnitude, input_sq_sum, sparsity):
        return _ops().row_mask(magnitude, sparsity)


class WandaPrune(PruneMethod):
    name = "wanda"

    def mask(self, magnitude, input_sq_sum, sparsity):
        return _ops().row_mask(magnitude * input_sq_sum.sqrt()[None, :], sparsity)


class TwoFourPrune(PruneMethod):
    name = "2:4"

    def mask(self, magnitude, input_sq_sum, sparsity):
        return _ops().two_four_mask(magnitude * input_sq_sum.sqrt()[None, :])


class LayerPrune(PruneMethod):
    name, structured = "layers", True

    def prune(self, model, sparsity, calibration):
        _ops().float_linears(model)
        return _ops().drop_layers(model, _ops().layer_influence(model, calibration), sparsity)


class MLPChannelPrune(PruneMethod):
    name, structured = "mlp_channels", True

    def prune(self, model, sparsity, calibration):
        _ops().float_linears(model)
        return _ops().drop_mlp_channels(model, _ops().input_stats(model, calibration), sparsity)


PRUNE_METHODS: dict[str, PruneMethod] = {m.name: m for m in (MagnitudePrune(), WandaPrune(), TwoFourPrune(),
                                                               LayerPrune(), MLPChannelPrune())}


def get_prune_method(name: str) -> PruneMethod:
    if name not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {name!r}; choose from {', '.join(PRUNE_METHODS)}")
    return PRUNE_METHODS[name]


def prune_model(model: nn.Module, method: str, sparsity: float, calibration: Calibration | None = None) -> dict:
    """Prune `model` in place; returns what was removed. `sparsity` is the share of weights (or of layers, or
    of MLP channels) to remove."""
    pruner = get_prune_method(method)
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be between 0 and 1")
    if pruner.needs_calibration and calibration is None:
        raise ValueError(f"{method} pruning needs calibration text (prune_calibration_text=PATH)")
    return pruner.prune(model, sparsity, calibration)


def _ops():
    """The pruning math (imports torch): loaded when a method runs."""
    return importlib.import_module("effinfer.compression.prune.ops")
