"""Attention over a paged KV cache: write this step's K/V into their slots, then attend.

The step's tokens arrive packed (no padding): sequence i owns rows
`query_start_loc[i]:query_start_loc[i+1]` and, after this step, has `seq_lens[i]` tokens in the cache.
Slot `s` of a layer's cache is index `s` of its flattened `[num_blocks * block_size]` axis, and
`slot = block_id * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from effinfer.layers.attn_backends import torch_ref


@dataclass
class AttentionMetadata:
    """Everything attention needs about one step's packed batch; built once per step, shared by all layers."""

    slot_mapping: torch.Tensor
    """[num_tokens] cache slot of each new token."""
    query_start_loc: list[int]
    """[num_seqs + 1] row offsets of each sequence's new tokens."""
    seq_lens: list[int]
    """[num_seqs] cached tokens per sequence after this step (prefix + new)."""
    block_tables: list[torch.Tensor]
    """Per sequence: [num_blocks] the block ids that hold its context, in order."""
    block_size: int
    mask_cache: dict = field(default_factory=dict)
    """Masks and slot lists built by the backend, reused by every layer of the step."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def context_slots(self, i: int) -> torch.Tensor:
        """[seq_len] slots of sequence i's positions 0..seq_len-1, derived from its block table on first
        use (only the per-sequence path needs them; batched decodes gather whole blocks)."""
        key = ("slots", i)
        if key not in self.mask_cache:
            blocks = self.block_tables[i]
            offsets = torch.arange(self.block_size, device=blocks.device)
            self.mask_cache[key] = (blocks[:, None] * self.block_size + offsets[None, :]).flatten()[:self.seq_lens[i]]
        return self.mask_cache[key]


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None
        """[2, num_kv_heads, num_blocks, block_size, head_dim], bound by the engine."""
        self.backend = torch_ref.paged_attention
        """The paged attention function; the engine binds the configured backend."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim]
        assert self.kv_cache is not None, "KV cache not bound: the model runner binds it before the first forward"
        k_cache, v_cache = self.kv_cache.flatten(2, 3)    # each [num_kv_heads, num_slots, head_dim]
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(v_cache.dtype))
        out = self.backend(q, self.kv_cache, meta, self.scale, self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
