"""Weight quantization methods, registered by name in `QUANT_METHODS`: the loader asks `get_quant_method`.

A method may plan per layer from the checkpoint itself (`QuantMethod.plan_layers`, e.g. `gguf`: the file's
own blocks); the loader asks for that plan when the method has one.

`prepare_model` swaps a model's `nn.Linear` layers for `QuantLinear` before memory is allocated (and the
output head for int8, with a tied embedding reading the same int8 rows); `finish_model` repacks after
the checkpoint is loaded.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # the tables are read by configs and the CLI, which import no torch
    from torch import nn

    from effinfer.layers.attention import KVCodec
    from effinfer.layers.linear import QuantMethod

QUANT_METHODS = {
    "int8": "effinfer.compression.quant.weight_only:Int8WeightOnly",
    "int4": "effinfer.compression.quant.weight_only:Int4WeightOnly",
    "w8a8": "effinfer.compression.quant.w8a8:W8A8",
    "gguf": "effinfer.compression.quant.gguf_blocks:GGUFBlocks",
}
"""Name -> `module:QuantMethod class`, imported when chosen."""
CPU_KERNELS = ("auto", "aten")
KV_CACHE_DTYPES = {
    "auto": "effinfer.layers.attention:AutoKV",
    "int8": "effinfer.compression.quant.kv_quant:Int8KV",
    "fp8": "effinfer.compression.quant.kv_quant:Fp8KV",
}
"""kv_cache_dtype name -> `module:KVCodec class` (compression/quant/kv_quant.py), imported when chosen."""


AUTO = "auto"
"""`quantization=auto` (the default): `choose_automatically` picks per checkpoint and machine."""


def available() -> list[str]:
    return sorted(QUANT_METHODS)


def choose_automatically(gguf_types: dict[str, int] | None, device: str) -> tuple[str | None, str]:
    """(method or None, why) for `quantization=auto`: the format that runs fastest here with no error beyond
    the checkpoint's own. A GGUF file of quantized blocks keeps them (`gguf`: 1.7x-3x bf16's single-stream
    decode here, a quarter of its memory, and its own quality) where the CPU has vector units for the
    int4/int8 kernels; anything else runs in the configured dtype."""
    import torch

    if gguf_types is None:
        return None, "a float checkpoint runs in its own precision"
    projections = {t for name, t in gguf_types.items() if name.endswith("_proj.weight")}
    float_types = {0, 1, 30}   # GGML F32, F16, BF16
    if not projections or projections & float_types:
        return None, "the GGUF file's layers are not all quantized: dequantized to the model dtype"
    if device != "cpu":
        return None, f"GGUF blocks run on effinfer's CPU kernels; on {device} they are dequantized"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return None, f"this CPU ({capability}) lacks AVX2 for the quantized kernels: dequantized"
    from effinfer import kernels

    kernel = "effinfer's int4 kernel (AVX512-VNNI)" if kernels.int4_gemv() is not None else f"PyTorch's {capability} int4 kernel"
    return "gguf", f"the file's own blocks, 4-bit ones on {kernel}; --quantization none dequantizes"


@dataclass
class QuantSpec:
    """What the loader needs to build a quantized model: `QuantConfig`'s fields (same names), plus the plan."""

    quantization: str
    group_size: int = 32
    symmetric: bool = False
    quantize_lm_head: bool = True
    cpu_kernel: str = "auto"
    layer_methods: dict[str, QuantMethod] = field(default_factory=dict)
    """Per-module methods planned from the checkpoint (GGUF blocks); others use `method`."""

    def method_class(self) -> type[QuantMethod]:
        return quant_method_class(self.quantization)

    def prepare(self, model: nn.Module) -> None:
        prepare_model(model, get_quant_method(self.quantization, self.group_size, self.symmetric),
                      self.quantize_lm_head, self.layer_methods, self.cpu_kernel)

    def finish(self, model: nn.Module) -> None:
        finish_model(model)


def quant_method_class(name: str) -> type[QuantMethod]:
    if name not in QUANT_METHODS:
        raise ValueError(f"unknown quantization {name!r}; choose from {', '.join(available())}")
    module, _, cls_name = QUANT_METHODS[name].partition(":")
    return getattr(importlib.import_module(module), cls_name)


def get_kv_dtype(name: str) -> KVCodec:
    """The codec of kv_cache_dtype `name`."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; supported: {', '.join(KV_CACHE_DTYPES)}")
    module, _, cls_name = KV_CACHE_DTYPES[name].partition(":")
    return getattr(importlib.import_module(module), cls_name)()


def get_quant_method(name: str, group_size: int = 32, symmetric: bool = False) -> QuantMethod:
    return quant_method_class(name).from_options(group_size, symmetric)


def prepare_model(model: nn.Module, method: QuantMethod, quantize_lm_head: bool = True,
                  layer_methods: dict[str, QuantMethod] | None = None, cpu_kernel: str = "auto") -> None:
    """Swap every linear layer of the decoder for a `QuantLinear` of `method` (or the per-layer method in
    `layer_methods`, keyed by module name); the output head becomes int8 (its rows are the vocabulary).
    Every method used gets `cpu_kernel` (QuantConfig.cpu_kernel)."""
    from torch import nn

    from effinfer.compression.quant.weight_only import Int8WeightOnly
    from effinfer.layers.linear import QuantEmbedding, QuantLinear

    layer_methods = layer_methods or {}
    for m in {method, *layer_methods.values()}:
        m.cpu_kernel = cpu_kernel
    for name, module in list(model.model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                full = f"model.{name}.{child_name}" if name else f"model.{child_name}"
                setattr(module, child_name, QuantLinear.from_linear(child, layer_methods.get(full, method)))
    if quantize_lm_head:
        head_method = Int8WeightOnly()
        head_method.cpu_kernel = cpu_kernel
        model.lm_head = QuantLinear.from_linear(model.lm_head, head_method)
        if model.config.tie_word_embeddings:
            model.model.embed_tokens = QuantEmbedding(model.lm_head)


def finish_model(model: nn.Module) -> None:
    from effinfer.layers.linear import QuantLinear

    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.method.process_weights_after_loading(module)
