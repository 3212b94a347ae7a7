"""The math behind the pruning methods of `effinfer.compression.prune`: masks, layer influence, and the
surgery that removes layers and MLP channels."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from effinfer.compression.quant.calibrate import collect_stats, decoder_linears

if TYPE_CHECKING:
    from effinfer.compression.prune import Calibration


def float_linears(model: nn.Module) -> dict[str, nn.Linear]:
    linears = decoder_linears(model)
    if not linears:
        raise ValueError("pruning works on an unquantized model; prune first, then quantize the saved result")
    return linears


def input_stats(model: nn.Module, calibration: Calibration) -> dict:
    return collect_stats(model, calibration.windows, calibration.score, keep_hessian=False,
                         show_progress=calibration.show_progress)


def layer_influence(model: nn.Module, calibration: Calibration) -> torch.Tensor:
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
        input_stats(model, calibration)
    finally:
        for h in hooks:
            h.remove()
    return influence


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep the largest (1 - sparsity) scores of each output row (Wanda's per-output comparison group)."""
    k = int(score.shape[1] * sparsity)
    drop = torch.topk(score, k, dim=1, largest=False).indices
    mask = torch.ones_like(score, dtype=torch.bool)
    return mask.scatter_(1, drop, False)


def two_four_mask(score: torch.Tensor) -> torch.Tensor:
    groups = score.view(score.shape[0], -1, 4)
    keep = torch.topk(groups, 2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).view(score.shape)


def drop_layers(model: nn.Module, influence: torch.Tensor, share: float) -> dict:
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


def drop_mlp_channels(model: nn.Module, stats: dict, share: float) -> dict:
    removed = 0
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        inter = mlp.down_proj.in_features
        norms = stats[f"model.layers.{i}.mlp.down_proj"].sq_sum.sqrt()
        importance = (mlp.down_proj.weight.abs().float() * norms[None, :]).sum(0)   # per intermediate channel
        keep = torch.sort(torch.topk(importance, inter - int(inter * share)).indices).values
        gate_up = mlp.gate_up_proj.weight.data
        rows = torch.cat([keep, keep + inter])
        mlp.gate_up_proj = linear_from(gate_up[rows])
        mlp.down_proj = linear_from(mlp.down_proj.weight.data[:, keep])
        removed += inter - len(keep)
    model.config.intermediate_size = len(keep)
    return {"method": "mlp_channels", "removed_channels": removed, "intermediate_size": len(keep)}


def linear_from(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    return linear.requires_grad_(False)
