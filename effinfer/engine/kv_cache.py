"""The paged KV cache: one `[2, num_blocks, block_size, num_kv_heads, head_dim]` tensor per attention layer,
bound to that layer's `Attention` module; block ids are shared by all layers."""

from __future__ import annotations

import torch
from torch import nn

from effinfer.layers.attention import Attention


def attention_layers(model: nn.Module) -> list[Attention]:
    return [m for m in model.modules() if isinstance(m, Attention)]


def bytes_per_block(model: nn.Module, block_size: int, dtype: torch.dtype) -> int:
    """Cache bytes that one block id costs across all layers (K and V)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * a.num_kv_heads * a.head_dim * itemsize for a in attention_layers(model))


def allocate_kv_cache(model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device | str) -> list[torch.Tensor]:
    caches = []
    for layer in attention_layers(model):
        layer.kv_cache = torch.zeros(2, num_blocks, block_size, layer.num_kv_heads, layer.head_dim,
                                     dtype=dtype, device=device)
        caches.append(layer.kv_cache)
    return caches
