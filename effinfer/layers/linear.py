"""Linear layers whose weights a `QuantMethod` owns (vLLM's pattern): the method creates the layer's
tensors, quantizes each checkpoint shard as it arrives, repacks after loading, and runs the matmul.

Models are written with plain `nn.Linear`; `QuantMethod.prepare` swaps them for `QuantLinear` on the
meta device before any memory is allocated, so a quantized model never holds a full-precision copy:
each checkpoint tensor is quantized on arrival and dropped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class QuantMethod(ABC):
    """One weight format. Registered by name in `effinfer.compression.quant`."""

    name: str = ""
    cpu_kernel: str = "auto"
    """Few-row matmuls on CPU: effinfer's own kernel where there is one and it builds (auto) or PyTorch's (aten)."""
    plan_layers = None
    """Set by a method that reads its format from the checkpoint (GGUF blocks): (the checkpoint's HF tensor name ->
    format type, the model's `fused_target`) -> {module name: the QuantMethod of that layer}. The loader calls it."""

    @classmethod
    def from_options(cls, group_size: int = 32, symmetric: bool = False) -> "QuantMethod":
        """An instance from the config's options (those it has no use for are ignored)."""
        return cls()

    @abstractmethod
    def create_weights(self, layer: "QuantLinear") -> None:
        """Register the layer's tensors (on the meta device; the model's `to_empty` allocates them)."""

    @abstractmethod
    def load_weight(self, layer: "QuantLinear", weight, row_offset: int) -> None:
        """Quantize rows `row_offset:row_offset + len(weight)` of the layer (one checkpoint shard)."""

    def process_weights_after_loading(self, layer: "QuantLinear") -> None:
        """Repack for the kernel once every shard is in (default: nothing to do)."""

    @abstractmethod
    def apply(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        """x [tokens, in_features] -> [tokens, out_features] (bias excluded)."""

    @abstractmethod
    def dequantize(self, layer: "QuantLinear") -> torch.Tensor:
        """The [out, in] weight the layer computes with: the reference that kernels are tested against."""

    def describe(self) -> dict:
        return {"method": self.name}

    def kernels(self, layer: "QuantLinear") -> tuple[str, str]:
        """What multiplies this layer as built: (few rows, as in decode; many rows, as in prefill and large
        batches). Bench records keep it, so a figure says which code made it."""
        return DEQUANTIZE, DEQUANTIZE


DEQUANTIZE = "dequantize + matmul"


def kernel_report(model: nn.Module) -> list[dict]:
    """Each quantized layer format in `model` with its layer count and the kernels its layers run."""
    counts: dict[tuple, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            fmt = " ".join(f"{k}={v}" if k != "method" else str(v) for k, v in module.method.describe().items())
            key = (fmt, *module.method.kernels(module))
            counts[key] = counts.get(key, 0) + 1
    return [{"format": fmt, "layers": n, "few_rows": few, "many_rows": many}
            for (fmt, few, many), n in counts.items()]


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, method: QuantMethod):
        super().__init__()
        self.in_features, self.out_features, self.method = in_features, out_features, method
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        method.create_weights(self)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: QuantMethod) -> "QuantLinear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None, method)

    def load_weight(self, weight, row_offset: int = 0) -> None:
        rows, cols = weight.shape
        if cols != self.in_features or row_offset + rows > self.out_features:
            raise ValueError(f"a weight of shape {tuple(weight.shape)} at row {row_offset} does not fit a "
                             f"[{self.out_features}, {self.in_features}] layer")
        self.method.load_weight(self, weight, row_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = self.method.apply(self, x.reshape(-1, shape[-1]))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={self.method.name}"


class QuantEmbedding(nn.Module):
    """Embedding lookup from a tied output head's int8 rows (one copy serves both)."""

    def __init__(self, head: QuantLinear):
        super().__init__()
        self.head = [head]       # a list: not a submodule, so its tensors are not counted twice

    def load_weight(self, weight, row_offset: int = 0) -> None:
        self.head[0].load_weight(weight, row_offset)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        return head.qweight[ids].to(head.scales.dtype) * head.scales[ids, None]
