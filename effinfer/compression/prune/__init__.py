"""Pruning, registered by name: `prune_model(llm, cfg) -> report` runs on a loaded float model.

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

import torch
from torch import nn

PRUNE_METHODS = ("magnitude", "wanda", "2:4", "layers", "mlp_channels")
NEEDS_CALIBRATION = ("wanda", "2:4", "layers", "mlp_channels")


def prune_model(llm, method: str, sparsity: float, calibration_text: str | None, num_tokens: int = 4096,
                show_progress: bool = True) -> dict:
    """Prune `llm`'s model in place; returns what was removed. `sparsity` is the share of weights (or of
    layers, or of MLP channels) to remove."""
    from effinfer.compression.quant.calibrate import decoder_linears

    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose from {', '.join(PRUNE_METHODS)}")
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be between 0 and 1")
    model = llm.engine.model
    linears = decoder_linears(model)
    if not linears:
        raise ValueError("pruning works on an unquantized model; prune first, then quantize the saved result")
    stats = influence = None
    if method in NEEDS_CALIBRATION:
        if not calibration_text:
            raise ValueError(f"{method} pruning needs calibration text (prune_calibration_text=PATH)")
        stats, influence = _calibrate(llm, calibration_text, num_tokens, method == "layers", show_progress)
    if method == "layers":
        return _drop_layers(model, influence, sparsity)
    if method == "mlp_channels":
        return _drop_mlp_channels(model, stats, sparsity)
    zeroed = total = 0
    for name, linear in linears.items():
        w = linear.weight.data
        score = w.abs().float()
        if method != "magnitude":
            score = score * stats[name].sq_sum.sqrt()[None, :]
        mask = _two_four_mask(score) if method == "2:4" else _row_mask(score, sparsity)
        w.mul_(mask.to(w.dtype))
        zeroed += int((~mask).sum())
        total += mask.numel()
    return {"method": method, "sparsity": zeroed / total, "zeroed_weights": zeroed}


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


def _calibrate(llm, text: str, num_tokens: int, layer_influence: bool, show_progress: bool):
    from effinfer.compression.quant.calibrate import calibration_windows, collect_stats

    windows = calibration_windows(llm.tokenizer, text, num_tokens, 256)
    influence = None
    hooks = []
    if layer_influence:
        layers = llm.engine.model.model.layers
        influence = torch.zeros(len(layers))

        def hook(i):
            def record(module, args, out):
                cos = torch.nn.functional.cosine_similarity(args[0].float(), out.float(), dim=-1)
                influence[i] += float((1 - cos).sum())
            return record
        hooks = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        stats = collect_stats(llm, windows, keep_hessian=False, show_progress=show_progress)
    finally:
        for h in hooks:
            h.remove()
    return stats, influence


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
