"""The attention of a compiled decode step (engine/compiled_decode.py), shared by the backends that have
no traced formulation of their own: all decodes of the step attended at once over their padded block
tables. On bf16 or fp32 pages with an AVX-512 CPU, effinfer's kernel reads the pages in place
(kernels/paged_attention.cpp); otherwise the attention is written as broadcast products and sums so that
`torch.compile` fuses the block gather, the dequantization and both reductions into a few loops."""

from __future__ import annotations

import torch


def decode_attention_traced(q: torch.Tensor, kv_cache, decode, scale: float,
                            sliding_window: int | None) -> torch.Tensor:
    # q [num_seqs, num_heads, head_dim]; decode: the step's DecodeBatch, row i is sequence i
    tables = decode.block_tables
    kernel = in_place_kernel(q, kv_cache)
    if kernel is not None:
        return kernel(q, kv_cache.data, tables, decode.seq_lens, scale, sliding_window or 0)
    mask = decode_mask(decode.seq_lens, tables.shape[1], kv_cache.shape[3], sliding_window)
    return attend_decodes_traced(q, kv_cache, tables, mask, scale)


def in_place_kernel(q: torch.Tensor, kv_cache):
    """The cache's in-place decode attention (`PagedKVCache.decode_kernel`) where it takes these queries
    (the pages' dtype, head_dim a multiple of 16, at most 16 query heads per KV head), else None."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    if kv_cache.decode_kernel is None or kv_cache.data.dtype != q.dtype or head_dim % 16 \
            or num_heads % kv_cache.data.shape[1] or num_heads // kv_cache.data.shape[1] > 16:
        return None
    return kv_cache.decode_kernel


def attend_decodes_traced(q, kv_cache, block_tables, mask, scale) -> torch.Tensor:
    """`torch_sdpa._attend_decodes` written as broadcast products and sums, for `torch.compile`: the block
    gather, the dequantization and both reductions fuse into a few loops, where two tiny batched matmuls cost
    ~10-20 us each on CPU. Eagerly it would materialize [.., context, head_dim] products: traced use only."""
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, _, block_size, _ = kv_cache.shape
    max_len = block_tables.shape[1] * block_size
    dtype = q.dtype
    kv = kv_cache.gather_blocks(block_tables.flatten(), torch.float32)
    k, v = kv.view(2, num_kv_heads, num_seqs, 1, max_len, head_dim)
    q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, 1, head_dim).transpose(0, 1).float()
    scores = (q * k).sum(-1) * scale                                   # [num_kv_heads, num_seqs, group, max_len]
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    out = (probs[..., None] * v).sum(-2)                               # [num_kv_heads, num_seqs, group, head_dim]
    return out.to(dtype).transpose(0, 1).reshape(num_seqs, num_heads, head_dim)


def decode_mask(lens: torch.Tensor, max_blocks: int, block_size: int, window: int | None) -> torch.Tensor:
    """[1, num_seqs, 1, max_blocks * block_size] which gathered positions each decode may attend to."""
    positions = torch.arange(max_blocks * block_size, device=lens.device)[None, :]
    mask = positions < lens[:, None]
    if window is not None:
        mask &= positions > lens[:, None] - 1 - window
    return mask[None, :, None, :]
