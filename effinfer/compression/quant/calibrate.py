"""Calibration statistics for GPTQ and AWQ: what each decoder linear layer sees on a small text set.

The float model scores calibration windows (a `score(ids)` callable: the engine's); forward hooks on every
decoder `nn.Linear` accumulate, per layer, the input's second moment H = sum(x^T x) (GPTQ's Hessian), the
mean absolute activation per input channel (AWQ's salience), and a reservoir of input rows (to score
AWQ's scale candidates on real activations). `collect_stats` takes them from the float model in
one pass (AWQ, SmoothQuant, Wanda); GPTQ's sequential order, layer by layer, is driven by
`effinfer/tools/quantize.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from effinfer.utils import progress

@dataclass
class LayerStats:
    in_features: int
    hessian: torch.Tensor | None = None
    abs_sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    """Sum of x_j^2 per input channel: Wanda's squared input norms (H's diagonal, without H)."""
    abs_max: torch.Tensor | None = None
    """Largest |x_j| per input channel (SmoothQuant)."""
    rows: int = 0
    samples: list = field(default_factory=list)
    max_samples: int = 512

    def add(self, x: torch.Tensor, keep_hessian: bool) -> None:
        x = x.detach().reshape(-1, self.in_features).float()
        if keep_hessian:
            h = x.t() @ x
            self.hessian = h if self.hessian is None else self.hessian + h
        a, sq = x.abs().sum(0), (x * x).sum(0)
        self.abs_sum = a if self.abs_sum is None else self.abs_sum + a
        self.sq_sum = sq if self.sq_sum is None else self.sq_sum + sq
        m = x.abs().amax(0)
        self.abs_max = m if self.abs_max is None else torch.maximum(self.abs_max, m)
        self.rows += x.shape[0]
        have = sum(s.shape[0] for s in self.samples)
        if have < self.max_samples:      # the first rows of each window, spread over the windows
            self.samples.append(x[::max(1, x.shape[0] // 32)][:self.max_samples - have].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(1, self.rows)

    @property
    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.samples)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"model.{name}": m for name, m in model.model.named_modules() if isinstance(m, nn.Linear)}


def collect_stats(model: nn.Module, windows: list[list[int]], score: Callable[[list[int]], object], keep_hessian: bool,
                  show_progress: bool = True) -> dict[str, LayerStats]:
    """Run the windows through `score` (an engine's, over the unquantized `model`) with hooks on every decoder linear."""
    linears = decoder_linears(model)
    stats = {name: LayerStats(m.in_features) for name, m in linears.items()}
    hooks = [m.register_forward_hook(lambda mod, args, out, s=stats[name]: s.add(args[0], keep_hessian))
             for name, m in linears.items()]
    try:
        for ids in progress(windows, "calibrate", show_progress, unit="window"):
            score(ids)
    finally:
        for h in hooks:
            h.remove()
    return stats


def calibration_windows(tokenizer, text: str, num_tokens: int, window: int) -> list[list[int]]:
    ids = tokenizer.encode(text)
    if len(ids) < window:
        raise ValueError(f"the calibration text has {len(ids)} tokens; it needs at least one window of {window}")
    count = max(1, min(num_tokens, len(ids)) // window)
    stride = max(window, (len(ids) - window) // max(1, count - 1)) if count > 1 else window
    return [ids[i * stride:i * stride + window] for i in range(count) if i * stride + window <= len(ids)]
