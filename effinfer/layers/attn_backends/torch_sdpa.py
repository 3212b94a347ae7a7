"""Batched paged attention: all single-token (decode) queries of a step attended in one go.

Decode rows are the bulk of a busy step; attending them one sequence at a time costs a few dozen tiny
ops per sequence per layer. Here their K/V blocks are gathered by block id (whole blocks, one index op
for K and V together) into a padded `[num_kv_heads, num_decodes, max_blocks * block_size]` batch with
the padding masked, the query heads that share a KV head become rows of one matrix, and two batched
matmuls with a softmax between them do the attention. Sequences of very different lengths go in
separate length buckets, so a few long contexts do not make every short one pad to their length.
Where the pages have effinfer's in-place kernel (`PagedKVCache.decode_kernel`: bf16/fp32 pages on an AVX-512
CPU), all decodes go to it instead, whatever their lengths, with no gather. Multi-token queries (prefill
chunks) take the reference path; compiled decode steps take traced_decode.py. Checked against `torch_ref` by
the tests.
"""

from __future__ import annotations

import torch

from effinfer.layers.attention import padded_block_tables
from effinfer.layers.attn_backends import torch_ref
from effinfer.layers.attn_backends.traced_decode import decode_mask, in_place_kernel
from effinfer.layers.attn_backends.traced_decode import decode_attention_traced  # noqa: F401 (backend API)


def paged_attention(q: torch.Tensor, kv_cache, meta, scale: float, sliding_window: int | None) -> torch.Tensor:
    # q [num_tokens, num_heads, head_dim]; kv_cache: the layer's PagedKVCache
    kernel = in_place_kernel(q, kv_cache)
    if kernel is not None:
        return _attend_in_place(kernel, q, kv_cache, meta, scale, sliding_window)
    plan = _decode_plan(meta, sliding_window, kv_cache.shape[3], q.device)
    if plan is None:
        return torch_ref.paged_attention(q, kv_cache, meta, scale, sliding_window)
    buckets, others = plan
    if len(buckets) == 1 and not others:  # a pure decode step of similar lengths: rows are 0..n-1 in order
        _, block_tables, mask = buckets[0]
        return _attend_decodes(q, kv_cache, block_tables, mask, scale)
    out = torch.empty_like(q)
    for rows, block_tables, mask in buckets:
        out.index_copy_(0, rows, _attend_decodes(q.index_select(0, rows), kv_cache, block_tables, mask, scale))
    for i in others:
        torch_ref.attend_one(q, kv_cache, meta, i, scale, sliding_window, out)
    return out


def _attend_in_place(kernel, q, kv_cache, meta, scale: float, sliding_window: int | None) -> torch.Tensor:
    key = "in place"
    if key not in meta.mask_cache:
        meta.mask_cache[key] = _in_place_plan(meta, q.device)
    plan = meta.mask_cache[key]
    if plan is None:
        return torch_ref.paged_attention(q, kv_cache, meta, scale, sliding_window)
    rows, tables, lens, others = plan
    if not others:   # a pure decode step: rows are the sequences in order
        return kernel(q, kv_cache.data, tables, lens, scale, sliding_window or 0)
    out = torch.empty_like(q)
    out.index_copy_(0, rows, kernel(q.index_select(0, rows), kv_cache.data, tables, lens, scale, sliding_window or 0))
    for i in others:
        torch_ref.attend_one(q, kv_cache, meta, i, scale, sliding_window, out)
    return out


def _in_place_plan(meta, device):
    """(decode rows, their padded block tables, their lengths, the other sequences) of this step; None when
    no sequence decodes."""
    decodes, others = _decodes_and_others(meta)
    if not decodes:
        return None
    rows = torch.tensor([meta.query_start_loc[i] for i in decodes], device=device)
    tables = padded_block_tables([meta.block_tables[i] for i in decodes], device)
    lens = torch.tensor([meta.seq_lens[i] for i in decodes], device=device)
    return rows, tables, lens, others


def _attend_decodes(q, kv_cache, block_tables, mask, scale) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    _, num_kv_heads, _, block_size, _ = kv_cache.shape
    max_len = block_tables.shape[1] * block_size
    # whole blocks, K and V at once: [2, num_kv_heads, num_seqs * max_blocks, block_size, head_dim]
    kv = kv_cache.gather_blocks(block_tables.flatten(), q.dtype)
    k, v = kv.view(2, num_kv_heads, num_seqs, max_len, head_dim)
    # query heads that share a KV head side by side: [num_kv_heads, num_seqs, group, head_dim]
    q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).transpose(0, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale    # [num_kv_heads, num_seqs, group, max_len]
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(num_seqs, num_heads, head_dim)


def _decode_plan(meta, window: int | None, block_size: int, device):
    """([(rows, padded block tables, mask)] per length bucket, indices of the other sequences) for this
    step's decodes, built once per step and cached in `meta`; None when no sequence decodes."""
    key = ("decode", window)
    if key not in meta.mask_cache:
        meta.mask_cache[key] = _build_decode_plan(meta, window, block_size, device)
    return meta.mask_cache[key]


def _build_decode_plan(meta, window, block_size: int, device):
    decodes, others = _decodes_and_others(meta)
    if not decodes:
        return None
    buckets = [_bucket(meta, group, window, block_size, device) for group in _length_buckets(meta, decodes, block_size)]
    return buckets, others


def _decodes_and_others(meta) -> tuple[list[int], list[int]]:
    """The step's sequences that decode one token, and the others (prefill chunks)."""
    decodes = [i for i in range(meta.num_seqs) if meta.query_start_loc[i + 1] - meta.query_start_loc[i] == 1]
    decode_set = set(decodes)
    return decodes, [i for i in range(meta.num_seqs) if i not in decode_set]


def _length_buckets(meta, decodes: list[int], block_size: int, max_buckets: int = 6) -> list[list[int]]:
    """Split decodes into groups of similar length, so that padding every sequence of a group to its
    longest wastes little gather and matmul work: a new group starts once a sequence needs more than
    1.25x (+1) the blocks of the group's shortest. Groups keep the step's row order when there is one."""
    by_len = sorted(decodes, key=lambda i: meta.seq_lens[i])
    groups: list[list[int]] = []
    for i in by_len:
        blocks = -(-meta.seq_lens[i] // block_size)
        if groups and (len(groups) == max_buckets or blocks <= 1.25 * groups[-1][0][1] + 1):
            groups[-1].append((i, blocks))
        else:
            groups.append([(i, blocks)])
    if len(groups) == 1:
        return [decodes]
    return [[i for i, _ in group] for group in groups]


def _bucket(meta, seqs: list[int], window, block_size: int, device):
    lens = torch.tensor([meta.seq_lens[i] for i in seqs], device=device)
    tables = padded_block_tables([meta.block_tables[i] for i in seqs], device)
    rows = torch.tensor([meta.query_start_loc[i] for i in seqs], device=device)
    return rows, tables, decode_mask(lens, tables.shape[1], block_size, window)
