"""The paged KV cache: one `[2, num_kv_heads, num_blocks, block_size, head_dim]` tensor per attention layer,
bound to that layer's `Attention` module; block ids are shared by all layers.

Heads lead so that a gather of whole blocks lands as `[num_kv_heads, tokens, head_dim]`, the layout
attention multiplies in, with no transpose copy."""

from __future__ import annotations

import torch
from torch import nn

from effinfer.layers.attention import Attention
from effinfer.layers.attn_backends import get_backend


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Cache bytes that one block id costs across all layers (K and V)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * a.num_kv_heads * a.head_dim * itemsize for a in attention_layers(model))


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str, backend: str = "torch_ref") -> list[torch.Tensor]:
    """Allocate and bind every attention layer's cache, and the attention backend that reads it."""
    caches = []
    attend = get_backend(backend)
    for layer in attention_layers(model):
        layer.backend = attend
        layer.kv_cache = torch.zeros(2, layer.num_kv_heads, num_blocks, block_size, layer.head_dim,
                                     dtype=dtype, device=device)
        caches.append(layer.kv_cache)
    return caches
