"""Model construction: a catalog name, a GGUF file or a Hugging Face folder -> model + tokenizer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from effinfer.compression.quant import QuantSpec
from effinfer.layers.rotary import RotaryEmbedding
from effinfer.loader import catalog
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
    gguf: object | None = None
    """The open `GGUFFile` when the weights came from one (its raw quantized blocks stay reachable)."""


def resolve_model_path(name: str, cache_dir: str | None = None, show_progress: bool = True) -> Path:
    """A local GGUF file or HF folder as is; a catalog name pulled into the cache if needed."""
    from effinfer.loader.safetensors import is_hf_folder

    path = Path(name).expanduser()
    if path.is_file() or path.is_dir():
        if path.is_dir() and not is_hf_folder(path):
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
    if path.is_dir():
        if quant is not None and quant.method == "gguf":
            raise ValueError("quantization=gguf uses a GGUF file's own blocks; this model is a folder")
        return _load_hf_folder(path, dtype, device, show_progress, quant)
    return _load_gguf(path, dtype, device, show_progress, catalog.cache_dir(cache_dir) / "tokenizers", quant)


def load_tokenizer(name: str, cache_dir: str | None = None) -> Tokenizer:
    """Only the tokenizer of a catalog name, GGUF file or HF folder (no weights are read)."""
    path = resolve_model_path(name, cache_dir, show_progress=False)
    if path.is_dir():
        from effinfer.loader.tokenizer import load_hf_tokenizer

        return load_hf_tokenizer(path)
    from effinfer.loader.gguf import GGUFFile
    from effinfer.loader.tokenizer import load_gguf_tokenizer

    eos = GGUFFile(path).arch_config().eos_token_ids
    return load_gguf_tokenizer(path, eos, catalog.cache_dir(cache_dir) / "tokenizers")


def _load_gguf(path: Path, dtype, device, show_progress, tokenizer_cache: Path, quant: QuantSpec | None) -> LoadedModel:
    from effinfer.loader.gguf import GGUFFile
    from effinfer.loader.tokenizer import load_gguf_tokenizer

    gguf_file = GGUFFile(path)
    cfg = gguf_file.arch_config()
    keep_blocks = quant is not None and quant.method == "gguf"
    if keep_blocks:
        from effinfer.compression.quant.gguf_blocks import plan_layers

        fused_target = get_model_class(cfg.architecture).fused_target
        quant.layer_methods = plan_layers(gguf_file.hf_tensor_types(), fused_target)
    model = _build(cfg, gguf_file.iter_weights(show_progress, keep_int4_blocks=keep_blocks), dtype, device, quant)
    return LoadedModel(model, load_gguf_tokenizer(path, cfg.eos_token_ids, tokenizer_cache), cfg, path, gguf_file)


def _load_hf_folder(path: Path, dtype, device, show_progress, quant: QuantSpec | None) -> LoadedModel:
    from effinfer.loader import safetensors as st
    from effinfer.loader.tokenizer import load_hf_tokenizer

    cfg = st.read_arch_config(path)
    tokenizer = load_hf_tokenizer(path)
    cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids))
    model = _build(cfg, st.iter_weights(path, show_progress), dtype, device, quant)
    return LoadedModel(model, tokenizer, cfg, path)


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
