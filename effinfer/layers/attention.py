"""Attention over a paged KV cache: write this step's K/V into their slots, then attend.

The step's tokens arrive packed (no padding): sequence i owns rows
`query_start_loc[i]:query_start_loc[i+1]` and, after this step, has `seq_lens[i]` tokens in the cache.
Slot `s` of a layer's cache is index `s` of its flattened `[num_blocks * block_size]` axis, and
`slot = block_id * block_size + offset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from effinfer.layers.attn_backends import Backend, get_backend


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
    decode: "DecodeBatch | None" = None
    """Set for a step of single-token decodes run by the compiled model: attention then reads only
    tensors (no Python lists or caches), so one traced graph serves every such step."""
    kv_bindings: dict | None = None
    """id(Attention) -> the (PagedKVCache, Backend) that layer uses in this step instead of its own: a side model
    runs attention modules it shares with the target (self-speculation) on its own pages."""

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


def padded_block_tables(tables: list[torch.Tensor], device, min_blocks: int = 1) -> torch.Tensor:
    """[num_seqs, max_blocks] block ids, short tables padded with block 0 (masked out by `decode_mask`).
    `min_blocks`: a compiled graph specializes on a width of 1, so its callers pad to 2."""
    width = max(min_blocks, max(len(t) for t in tables))
    padded = torch.zeros(len(tables), width, dtype=torch.long, device=device)
    for row, table in enumerate(tables):
        padded[row, :len(table)] = table
    return padded


@dataclass
class DecodeBatch:
    """A pure decode step as tensors: one new token per sequence, row i of the step is sequence i."""

    block_tables: torch.Tensor
    """[num_seqs, max_blocks] each sequence's blocks, padded with block 0."""
    seq_lens: torch.Tensor
    """[num_seqs] cached tokens per sequence after this step."""


class KVCodec(Protocol):
    """How pages store K and V (the kv_cache_dtype). The codecs and their table `KV_CACHE_DTYPES` live in
    compression/quant/kv_quant.py; whoever allocates the pages hands one to `PagedKVCache`."""

    name: str
    has_scales: bool
    """Pages keep one scale per token and KV head beside the values (`PagedKVCache.scales`)."""
    scales_keys: bool
    """Keys are divided by per-channel scales before they are quantized (`PagedKVCache.key_scale`, from
    `key_scales(magnitude)`, a method such a codec has, applied to each layer's estimated key size)."""

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype: ...

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [..., head_dim] -> (stored values [..., head_dim], per-vector scales [...] or None)."""

    def dequantize(self, values: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor: ...


class AutoKV:
    """kv_cache_dtype "auto": pages in the model dtype, stored as computed (the default codec)."""

    name = "auto"
    has_scales = False
    scales_keys = False

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x, None

    def dequantize(self, values: torch.Tensor, scales: None, dtype: torch.dtype) -> torch.Tensor:
        return values.to(dtype)


@dataclass
class PagedKVCache:
    """One layer's pages: `data` [2, num_kv_heads, num_blocks, block_size, head_dim] (K then V) in the
    codec's storage dtype, with `scales` [2, num_kv_heads, num_blocks, block_size] if the codec keeps them."""

    data: torch.Tensor
    scales: torch.Tensor | None = None
    codec: KVCodec = field(default_factory=AutoKV)
    key_scale: torch.Tensor | None = None
    """[num_kv_heads, head_dim] per-channel divisors applied to keys before quantizing, for a codec that
    `scales_keys` (int8, see kv_quant). Pages and gathers keep the divided keys; queries are multiplied by
    the same scales instead (`scale_queries`): q . (k / s) * s = (q * s) . (k / s), a few rows per step
    rather than the whole gathered context."""
    _query_scale: torch.Tensor | None = None
    """`key_scale` repeated over the query heads that share each KV head (built on first use)."""
    decode_kernel: Callable | None = None
    """`kernels.paged_decode_attention` where it reads these pages in place (set by whoever allocates them);
    compiled decode steps call it instead of gathering the blocks (layers/attn_backends/traced_decode.py)."""

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # k, v [num_tokens, num_kv_heads, head_dim] -> their slots
        two, heads, _, _, head_dim = self.data.shape
        values, value_scales = self._quantize(k, v)
        self.data.view(two, heads, -1, head_dim).index_copy_(2, slot_mapping, values)
        if value_scales is not None:
            self.scales.view(two, heads, -1).index_copy_(2, slot_mapping, value_scales)

    def write_traced(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """`write` for a compiled step: an index_put_ into the pages themselves, not into a view of them.
        The compiler performs it in place inside a generated kernel; through a view (as `write` does), the
        traced write became a copy of the whole cache every step (35-44 ms)."""
        block_size = self.data.shape[3]
        blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
        values, value_scales = self._quantize(k, v)
        self.data[:, :, blocks, offsets] = values
        if value_scales is not None:
            self.scales[:, :, blocks, offsets] = value_scales

    def _quantize(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """k, v [num_tokens, num_kv_heads, head_dim] -> pages' values [2, heads, tokens, dim] (and scales)."""
        if self.key_scale is not None:
            k = k / self.key_scale
        values, value_scales = self.codec.quantize(torch.stack((k, v)).transpose(1, 2))
        if value_scales is not None:
            value_scales = value_scales.to(self.scales.dtype)
        return values.to(self.data.dtype), value_scales

    def gather_slots(self, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the given slots: each [num_kv_heads, len(slots), head_dim]."""
        values = self.data.flatten(2, 3).index_select(2, slots)
        scales = self.scales.flatten(2, 3).index_select(2, slots) if self.scales is not None else None
        kv = self.codec.dequantize(values, scales, dtype)
        return kv[0], kv[1]

    def gather_blocks(self, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Whole blocks, K and V at once: [2, num_kv_heads, len(block_ids), block_size, head_dim]."""
        two, heads, num_blocks, block_size, head_dim = self.data.shape
        values = self.data.view(two, heads, num_blocks, -1).index_select(2, block_ids)
        values = values.view(two, heads, len(block_ids), block_size, head_dim)
        scales = self.scales.index_select(2, block_ids) if self.scales is not None else None
        return self.codec.dequantize(values, scales, dtype)

    def scale_queries(self, q: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim] times its KV head's key scales (see `key_scale`)."""
        if self.key_scale is None:
            return q
        if self._query_scale is None or self._query_scale.shape[0] != q.shape[1]:
            group = q.shape[1] // self.key_scale.shape[0]
            self._query_scale = self.key_scale.repeat_interleave(group, dim=0)
        return q * self._query_scale.to(q.dtype)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: PagedKVCache | None = None
        """This layer's pages, bound by `engine.kv_cache.allocate_kv_cache`."""
        self.backend: Backend = get_backend("torch_ref")
        """The attention backend (attn_backends); `allocate_kv_cache` binds the configured one."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [num_tokens, num_heads, head_dim]; k, v [num_tokens, num_kv_heads, head_dim]
        cache, backend = meta.kv_bindings[id(self)] if meta.kv_bindings else (self.kv_cache, self.backend)
        assert cache is not None, "KV cache not bound: the engine allocates the pages before the first forward"
        q = cache.scale_queries(q)
        if meta.decode is None:
            cache.write(meta.slot_mapping, k, v)
            out = backend.paged_attention(q, cache, meta, self.scale, self.sliding_window)
        else:    # a compiled decode step (engine/compiled_decode.py)
            cache.write_traced(meta.slot_mapping, k, v)
            out = backend.decode_attention_traced(q, cache, meta.decode, self.scale, self.sliding_window)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
