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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from effinfer.compression.quant.calibrate import collect_stats, decoder_linears


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
        linears = _float_linears(model)
        stats = _input_stats(model, calibration) if self.needs_calibration else None
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
        return _row_mask(magnitude, sparsity)


class WandaPrune(PruneMethod):
    name = "wanda"

    def mask(self, magnitude, input_sq_sum, sparsity):
        return _row_mask(magnitude * input_sq_sum.sqrt()[None, :], sparsity)


class TwoFourPrune(PruneMethod):
    name = "2:4"

    def mask(self, magnitude, input_sq_sum, sparsity):
        return _two_four_mask(magnitude * input_sq_sum.sqrt()[None, :])


class LayerPrune(PruneMethod):
    name, structured = "layers", True

    def prune(self, model, sparsity, calibration):
        _float_linears(model)
        return _drop_layers(model, _layer_influence(model, calibration), sparsity)


class MLPChannelPrune(PruneMethod):
    name, structured = "mlp_channels", True

    def prune(self, model, sparsity, calibration):
        _float_linears(model)
        return _drop_mlp_channels(model, _input_stats(model, calibration), sparsity)


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


def _float_linears(model: nn.Module) -> dict[str, nn.Linear]:
    linears = decoder_linears(model)
    if not linears:
        raise ValueError("pruning works on an unquantized model; prune first, then quantize the saved result")
    return linears


def _input_stats(model: nn.Module, calibration: Calibration) -> dict:
    return collect_stats(model, calibration.windows, calibration.score, keep_hessian=False,
                         show_progress=calibration.show_progress)


def _layer_influence(model: nn.Module, calibration: Calibration) -> torch.Tensor:
    """Per decoder layer, the summed 1 - cos(input, output) over the calibration tokens (block influence)."""
    layers = model.model.layers
    influence = torch.zeros(len(layers))

    def hook(i):
        def record(module, args, out):
            cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
            influence[i] += float((1 - cos).sum())
        return record
    hooks = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        _input_stats(model, calibration)
    finally:
        for h in hooks:
            h.remove()
    return influence


def _row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest (1 - sparsity) scores of each output row (Wanda's per-output comparison group)."""
    k = int(score.shape[1] * sparsity)
    drop = torch.topk(score, k, dim=1, largest=False).indices
    mask = torch.ones_like(score, dtype=torch.bool)
    return mask.scatter_(1, drop, False)


def _two_four_mask(score: torch.Tensor) -> torch.Tensor:
    groups = score.view(score.shape[0], -1, 4)
    keep = torch.topk(groups, 2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).view(score.shape)


def _drop_layers(model: nn.Module, influence: torch.Tensor, share: float) -> dict:
    n = len(model.model.layers)
    count = max(1, round(n * share))
    if count >= n:
        raise ValueError(f"removing {count} of {n} layers leaves none")
    drop = sorted(torch.argsort(influence)[:count].tolist())
    keep = [i for i in range(n) if i not in drop]
    model.model.layers = nn.ModuleList(model.model.layers[i] for i in keep)
    if hasattr(model, "is_sliding"):        # Gemma 3: which kept layers use the local window
        model.is_sliding = [model.is_sliding[i] for i in keep]
    model.config.num_layers = len(keep)
    return {"method": "layers", "removed_layers": drop, "block_influence": [round(float(v), 4) for v in influence]}


def _drop_mlp_channels(model: nn.Module, stats: dict, share: float) -> dict:
    removed = 0
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        inter = mlp.down_proj.in_features
        norms = stats[f"model.layers.{i}.mlp.down_proj"].sq_sum.sqrt()
        importance = (mlp.down_proj.weight.abs().float() * norms[None, :]).sum(0)   # per intermediate channel
        keep = torch.sort(torch.topk(importance, inter - int(inter * share)).indices).values
        gate_up = mlp.gate_up_proj.weight.data
        rows = torch.cat([keep, keep + inter])
        mlp.gate_up_proj = _linear_from(gate_up[rows])
        mlp.down_proj = _linear_from(mlp.down_proj.weight.data[:, keep])
        removed += inter - len(keep)
    model.config.intermediate_size = len(keep)
    return {"method": "mlp_channels", "removed_channels": removed, "intermediate_size": len(keep)}


def _linear_from(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    return linear.requires_grad_(False)
