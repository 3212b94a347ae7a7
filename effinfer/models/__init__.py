"""Model construction: a catalog name, a GGUF file or a Hugging Face folder -> model + tokenizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from effinfer.compression.quant import AUTO, QuantSpec, choose_automatically
from effinfer.layers.rotary import RotaryEmbedding
from effinfer.loader.arch_config import ArchConfig
from effinfer.loader.checkpoint import is_quantized_checkpoint, iter_checkpoint_weights, read_config
from effinfer.loader.source import open_source, resolve_model_path
from effinfer.loader.tokenizer import Tokenizer
from effinfer.models.registry import get_model_class


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Tokenizer
    config: ArchConfig
    path: Path
    prune_report: dict | None = None
    """What pruning at load removed from the model, if it was pruned."""
    quantization: str | None = None
    """The weight format it was built in (what `quantization=auto` chose)."""
    weights_note: str = ""
    """One line: the weights' format and why (start-up summary)."""


def load_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
               cache_dir: str | None = None, show_progress: bool = True, quant: QuantSpec | None = None,
               split=None) -> LoadedModel:
    """`split`: a parallel plan maker, (architecture) -> the part this process holds (a tensor-parallel slice, a
    pipeline stage), with `local_config(cfg)` (the part's architecture, which the model class builds),
    `local_name(name)` (a module or tensor's name in the part; None: not held), `weights(stream)` (the checkpoint
    stream cut to the part, in its names) and `parallelize(model, vocab_size)` (after loading); None: the whole."""
    path = resolve_model_path(name, cache_dir, show_progress)
    auto = quant is not None and quant.quantization == AUTO
    if auto and is_quantized_checkpoint(path):
        quant = None
    if is_quantized_checkpoint(path):   # GPTQ/AWQ from `effinfer quantize`: 4-bit layers over a base model
        checkpoint = read_config(path)
        note = f"{checkpoint['quant_method']} checkpoint"
        if quant is not None:
            raise ValueError(f"{path} is already quantized ({checkpoint['quant_method']}); drop the quantization option")
        load_as = checkpoint.get("load_as", "int4")   # "none": a pruned float checkpoint
        quant = QuantSpec(load_as, checkpoint["group_size"]) if load_as != "none" else None
        source = open_source(resolve_model_path(checkpoint["base_model"], cache_dir, show_progress), cache_dir)
        weights = iter_checkpoint_weights(path, source.iter_weights(show_progress), checkpoint["group_size"])
    else:
        source = open_source(path, cache_dir)
        note = ""
        if auto:
            chosen, why = choose_automatically(source.gguf.hf_tensor_types() if source.gguf else None, device)
            quant = dataclasses.replace(quant, quantization=chosen) if chosen else None
            note = f"quantization=auto chose {chosen or 'none'}: {why}"
        keep_blocks = quant is not None and quant.method_class().plan_layers is not None
        if keep_blocks:   # the method reads each layer's format from the file: plan per layer
            if source.gguf is None:
                raise ValueError(f"quantization={quant.quantization} uses a GGUF file's own blocks; this model is a folder")
            fused_target = get_model_class(source.config.architecture).fused_target
            quant.layer_methods = quant.method_class().plan_layers(source.gguf.hf_tensor_types(), fused_target)
        weights = source.iter_weights(show_progress, keep_blocks)
    cfg = source.config
    if split is not None:
        if is_quantized_checkpoint(path):
            raise ValueError("tensor and pipeline parallelism do not split GPTQ/AWQ checkpoints; load the base model "
                             "with quantization=int4 or a GGUF file instead")
        part = split(source.config)
        cfg, weights = part.local_config(cfg), part.weights(weights)
        if quant is not None and quant.layer_methods:   # a GGUF file's per-layer plan, renamed as its layers are
            quant.layer_methods = {local: method for name, method in quant.layer_methods.items()
                                   if (local := part.local_name(name)) is not None}
    model = _build(cfg, weights, dtype, device, quant)
    if split is not None:
        part.parallelize(model, source.config.vocab_size)
    weights_note = f"weights {quant.quantization if quant else str(dtype).removeprefix('torch.')}" + \
        (f" ({note})" if note else "")
    # the model holds no view of the file: dropping the source unmaps it (its pages leave resident memory)
    return LoadedModel(model, source.tokenizer(), source.config, path,
                       quantization=quant.quantization if quant else None, weights_note=weights_note)


def model_arch_config(name: str, cache_dir: str | None = None, show_progress: bool = True) -> ArchConfig:
    """The architecture of a catalog name (pulled if needed), GGUF file or HF folder, or of a quantized
    checkpoint's base model, without reading any weight."""
    path = resolve_model_path(name, cache_dir, show_progress)
    if is_quantized_checkpoint(path):
        path = resolve_model_path(read_config(path)["base_model"], cache_dir, show_progress)
    return open_source(path, cache_dir).config


def _build(cfg: ArchConfig, weights, dtype: torch.dtype, device: str, quant: QuantSpec | None = None) -> nn.Module:
    """Construct on the meta device (no memory), swap in quantized layers, allocate in the target dtype,
    then fill from `weights` (quantized layers quantize each tensor as it arrives)."""
    model_cls = get_model_class(cfg.architecture)
    with torch.device("meta"):
        model = model_cls(cfg)
        if quant is not None:
            quant.prepare(model)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.load_weights(weights)
    if quant is not None:
        quant.finish(model)
    for module in model.modules():  # buffers computed in __init__ were lost on the meta device
        if isinstance(module, RotaryEmbedding):
            module.reset_inv_freq()
    return model.eval().requires_grad_(False)
