"""The paged KV cache: one `[2, num_kv_heads, num_blocks, block_size, head_dim]` tensor per attention layer
(in the storage dtype of the KV codec it is given, e.g. from `kv_quant.KV_CACHE_DTYPES`: 16-bit, or 8-bit with
per-token scales), bound to that layer's `Attention` module as a `PagedKVCache` with the codec, together with
the attention backend it is given; block ids are shared by all layers.

Heads lead so that a gather of whole blocks lands as `[num_kv_heads, tokens, head_dim]`, the layout
attention multiplies in, with no transpose copy."""

from __future__ import annotations

import math
import mmap

import torch
from torch import nn

from effinfer import kernels
from effinfer.layers.attention import Attention, AutoKV, KVCodec, PagedKVCache
from effinfer.layers.attn_backends import Backend, get_backend


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype, codec: KVCodec = AutoKV()) -> int:
    """Cache bytes that one block id costs across all layers (K and V, and int8's per-token scales)."""
    itemsize = codec.storage_dtype(dtype).itemsize
    scale_bytes = dtype.itemsize if codec.has_scales else 0
    return sum(2 * block_size * a.num_kv_heads * (a.head_dim * itemsize + scale_bytes) for a in attention_layers(model))


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str, backend: Backend | None = None,
                      codec: KVCodec = AutoKV()) -> list[PagedKVCache]:
    """Allocate and bind every attention layer's cache in `codec`, and the attention `backend` (default
    torch_ref, the oracle) that reads it."""
    backend = backend or get_backend("torch_ref")
    layers = attention_layers(model)
    caches = new_kv_caches(layers, num_blocks, block_size, dtype, device, codec)
    key_scales = _key_scales(model, dtype, codec) if codec.scales_keys else {}
    for layer, cache in zip(layers, caches):
        layer.backend, layer.kv_cache = backend, cache
        cache.key_scale = key_scales.get(id(layer))
    return caches


def _key_scales(model: nn.Module, dtype: torch.dtype, codec: KVCodec) -> dict[int, torch.Tensor]:
    """id(Attention) -> its keys' per-channel divisors, for decoder layers that can estimate their keys' size."""
    blocks = getattr(getattr(model, "model", None), "layers", [])
    return {id(block.self_attn.attn): codec.key_scales(block.key_magnitude()).to(dtype)
            for block in blocks if hasattr(block, "key_magnitude")}


def new_kv_caches(layers: list[Attention], num_blocks: int, block_size: int, dtype: torch.dtype,
                  device: torch.device | str, codec: KVCodec = AutoKV()) -> list[PagedKVCache]:
    """Zeroed pages for each of `layers` in `codec`, unbound."""
    caches = []
    for layer in layers:
        data = zeroed_pages((2, layer.num_kv_heads, num_blocks, block_size, layer.head_dim),
                            codec.storage_dtype(dtype), device)
        scales = (zeroed_pages((2, layer.num_kv_heads, num_blocks, block_size), dtype, device)
                  if codec.has_scales else None)
        caches.append(PagedKVCache(data, scales, codec, decode_kernel=_decode_kernel(data, scales)))
    return caches


def _decode_kernel(data: torch.Tensor, scales: torch.Tensor | None):
    """effinfer's in-place decode attention where it reads these pages (bf16 or fp32 values without scales, on
    a CPU with AVX-512), else None: looked up here, outside the traced step, which only calls it."""
    if scales is not None or data.device.type != "cpu" or data.dtype not in (torch.bfloat16, torch.float32):
        return None
    return kernels.paged_decode_attention()


def zeroed_pages(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed tensor; on the CPU backed by an anonymous memory map, whose pages the OS provides (zeroed) on
    first touch, where `torch.zeros` would write, and so make resident, every byte up front."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    pages = mmap.mmap(-1, max(count * dtype.itemsize, 1))
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)
