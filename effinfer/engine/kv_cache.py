"""The paged KV cache: one `[2, num_kv_heads, num_blocks, block_size, head_dim]` tensor per attention layer
(16-bit, or 8-bit with per-token scales: kv_cache_dtype), bound to that layer's `Attention` module as a
`PagedKVCache`; block ids are shared by all layers.

Heads lead so that a gather of whole blocks lands as `[num_kv_heads, tokens, head_dim]`, the layout
attention multiplies in, with no transpose copy."""

from __future__ import annotations

import torch
from torch import nn

from effinfer.compression.quant import kv_quant
from effinfer.layers.attention import Attention, PagedKVCache
from effinfer.layers.attn_backends import get_backend


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype, kind: str = "auto") -> int:
    """Cache bytes that one block id costs across all layers (K and V, and int8's per-token scales)."""
    itemsize = torch.empty((), dtype=kv_quant.storage_dtype(kind, dtype)).element_size()
    scale_bytes = torch.empty((), dtype=dtype).element_size() if kv_quant.has_scales(kind) else 0
    return sum(2 * block_size * a.num_kv_heads * (a.head_dim * itemsize + scale_bytes) for a in attention_layers(model))


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str, backend: str = "torch_ref", kind: str = "auto") -> list[PagedKVCache]:
    """Allocate and bind every attention layer's cache, and the attention backend that reads it."""
    attend = get_backend(backend)
    layers = attention_layers(model)
    caches = new_kv_caches(layers, num_blocks, block_size, dtype, device, kind)
    key_scales = _key_scales(model, dtype) if kv_quant.has_scales(kind) else {}
    for layer, cache in zip(layers, caches):
        layer.backend, layer.kv_cache = attend, cache
        cache.key_scale = key_scales.get(id(layer))
    return caches


def _key_scales(model: nn.Module, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """id(Attention) -> its keys' per-channel divisors, for decoder layers that can estimate their keys' size."""
    blocks = getattr(getattr(model, "model", None), "layers", [])
    return {id(block.self_attn.attn): kv_quant.key_channel_scales(block.key_magnitude()).to(dtype)
            for block in blocks if hasattr(block, "key_magnitude")}


def new_kv_caches(layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device | str, kind: str = "auto") -> list[PagedKVCache]:
    """Zeroed pages for each of `layers`, unbound."""
    caches = []
    for layer in layers:
        data = torch.zeros(2, layer.num_kv_heads, num_blocks, block_size, layer.head_dim,
                           dtype=kv_quant.storage_dtype(kind, dtype), device=device)
        scales = (torch.zeros(2, layer.num_kv_heads, num_blocks, block_size, dtype=dtype, device=device)
                  if kv_quant.has_scales(kind) else None)
        caches.append(PagedKVCache(data, scales, kind))
    return caches
