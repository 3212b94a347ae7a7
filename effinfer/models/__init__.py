"""Model construction: a catalog name, a GGUF file or a Hugging Face folder -> model + tokenizer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from effinfer.compression.quant import AUTO, QuantSpec, choose_automatically
from effinfer.layers.rotary import RotaryEmbedding
from effinfer.loader import catalog
from effinfer.loader.checkpoint import is_quantized_checkpoint, iter_checkpoint_weights, read_config
from effinfer.loader.tokenizer import Tokenizer
from effinfer.loader.arch_config import ArchConfig
from effinfer.models.registry import get_model_class
from effinfer.utils import ModelLoadError


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


def resolve_model_path(name: str, cache_dir: str | None = None, show_progress: bool = True) -> Path:
    """A local GGUF file or HF folder as is; a catalog name pulled into the cache if needed."""
    from effinfer.loader.safetensors import is_hf_folder

    path = Path(name).expanduser()
    if path.is_file() or path.is_dir():
        if path.is_dir() and not is_hf_folder(path) and not is_quantized_checkpoint(path):
            raise ModelLoadError(f"{path} is a folder without config.json; expected a Hugging Face model folder")
        return path
    if name in catalog.CATALOG:
        return catalog.pull(name, cache_dir, show_progress)
    if path.suffix == ".gguf" or "/" in name:
        raise ModelLoadError(f"model path {name!r} does not exist")
    catalog.get_entry(name)  # raises with the list of catalog names
    raise AssertionError("unreachable")


def load_model(name: str, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
               cache_dir: str | None = None, show_progress: bool = True, quant: QuantSpec | None = None) -> LoadedModel:
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
        source = _open_source(resolve_model_path(checkpoint["base_model"], cache_dir, show_progress), cache_dir)
        weights = iter_checkpoint_weights(path, source.iter_weights(show_progress), checkpoint["group_size"])
    else:
        source = _open_source(path, cache_dir)
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
    model = _build(source.config, weights, dtype, device, quant)
    weights_note = f"weights {quant.quantization if quant else str(dtype).removeprefix('torch.')}" + \
        (f" ({note})" if note else "")
    # the model holds no view of the file: dropping the source unmaps it (its pages leave resident memory)
    return LoadedModel(model, source.tokenizer(), source.config, path,
                       quantization=quant.quantization if quant else None, weights_note=weights_note)


def load_tokenizer(name: str, cache_dir: str | None = None) -> Tokenizer:
    """Only the tokenizer of a catalog name, GGUF file or HF folder (no weights are read)."""
    path = resolve_model_path(name, cache_dir, show_progress=False)
    if is_quantized_checkpoint(path):
        return load_tokenizer(read_config(path)["base_model"], cache_dir)
    return _open_source(path, cache_dir).tokenizer()


@dataclass
class _Source:
    """A checkpoint opened but not yet read: its config, a weight iterator and a tokenizer loader."""

    config: ArchConfig
    iter_weights: Callable
    tokenizer: Callable[[], Tokenizer]
    gguf: object | None = None


def _open_source(path: Path, cache_dir: str | None) -> _Source:
    if path.is_dir():
        from effinfer.loader import safetensors as st
        from effinfer.loader.tokenizer import load_hf_tokenizer

        cfg = st.read_arch_config(path)
        tokenizer = load_hf_tokenizer(path)
        cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids))
        return _Source(cfg, lambda show, keep_blocks=False: st.iter_weights(path, show), lambda: tokenizer)
    from effinfer.loader.gguf import GGUFFile
    from effinfer.loader.tokenizer import load_gguf_tokenizer

    gguf_file = GGUFFile(path)
    cfg = gguf_file.arch_config()
    tokenizer_cache = catalog.cache_dir(cache_dir) / "tokenizers"
    return _Source(cfg, lambda show, keep_blocks=False: gguf_file.iter_weights(show, keep_int4_blocks=keep_blocks),
                   lambda: load_gguf_tokenizer(path, cfg.eos_token_ids, tokenizer_cache), gguf_file)


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


def open_weights(path: Path | str, cache_dir: str | None = None, show_progress: bool = True):
    """The Hugging Face-named float tensors of a GGUF file or HF folder, without building a model."""
    return _open_source(Path(path), cache_dir).iter_weights(show_progress)
