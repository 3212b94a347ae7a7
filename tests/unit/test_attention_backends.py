"""Every registered backend against the per-sequence reference (`torch_ref.paged_attention`) on random
pages: mixed steps of decodes and prefill chunks, grouped-query heads, sliding windows, scattered block
tables; and its traced decode (the compiled step's attention) on every KV-cache dtype."""

from __future__ import annotations

import pytest
import torch

from effinfer import kernels
from effinfer.compression.quant import KV_CACHE_DTYPES, get_kv_dtype
from effinfer.layers.attention import AttentionMetadata, DecodeBatch, PagedKVCache
from effinfer.layers.attn_backends import ATTENTION_BACKENDS, get_backend, torch_ref

BLOCK, KV_HEADS, HEADS, DIM, NUM_BLOCKS = 4, 2, 6, 8, 64


def metadata(query_lens, seq_lens, gen):
    perm = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, new_slots, starts = [], [], [0]
    for q_len, s_len in zip(query_lens, seq_lens):
        blocks = torch.tensor([perm.pop() for _ in range(-(-s_len // BLOCK))])
        slots = (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:s_len]
        tables.append(blocks)
        new_slots.append(slots[s_len - q_len:])
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(torch.cat(new_slots), starts, list(seq_lens), tables, BLOCK)


def fresh(meta):
    """The same step without the masks and plans a backend cached in `meta`."""
    return AttentionMetadata(meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                             meta.block_size)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("query_lens, seq_lens", [
    ([1, 1, 1], [9, 3, 17]),                 # pure decode step
    ([1, 6, 1, 3], [12, 6, 1, 20]),          # decodes mixed with a fresh prompt and a later chunk
    ([5, 2], [5, 11]),                       # prefill chunks only
])
def test_backend_equals_reference(backend, query_lens, seq_lens, window):
    gen = torch.Generator().manual_seed(0)
    meta = metadata(query_lens, seq_lens, gen)
    kv_cache = PagedKVCache(torch.randn(2, KV_HEADS, NUM_BLOCKS, BLOCK, DIM, generator=gen))
    q = torch.randn(sum(query_lens), HEADS, DIM, generator=gen)
    expected = torch_ref.paged_attention(q, kv_cache, meta, 0.3, window)
    got = get_backend(backend).paged_attention(q, kv_cache, fresh(meta), 0.3, window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_every_backend_is_described():
    for name, info in ATTENTION_BACKENDS.items():
        assert info.description, name
        assert get_backend(name).name == name and info.module.endswith(name)


def test_unknown_backend_lists_the_known():
    with pytest.raises(ValueError, match="supported: " + ", ".join(ATTENTION_BACKENDS)):
        get_backend("flash")


def test_length_buckets_cover_every_decode_once():
    from types import SimpleNamespace

    from effinfer.layers.attn_backends.torch_sdpa import _length_buckets

    seq_lens = [3, 200, 5, 90, 4, 180, 60, 7]
    groups = _length_buckets(SimpleNamespace(seq_lens=seq_lens), list(range(len(seq_lens))), block_size=4)
    assert sorted(i for g in groups for i in g) == list(range(len(seq_lens)))
    assert len(groups) > 1
    for g in groups:                 # within a group, lengths stay within the 1.25x (+1 block) rule
        blocks = sorted(-(-seq_lens[i] // 4) for i in g)
        assert blocks[-1] <= 1.25 * blocks[0] + 1 or len(groups) == 6


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_bucketed_mixed_lengths_equal_reference(backend):
    gen = torch.Generator().manual_seed(6)
    seq_lens = [3, 60, 5, 40, 4, 33, 17, 2]
    meta = metadata([1] * len(seq_lens), seq_lens, gen)
    kv_cache = PagedKVCache(torch.randn(2, KV_HEADS, NUM_BLOCKS, BLOCK, DIM, generator=gen))
    q = torch.randn(len(seq_lens), HEADS, DIM, generator=gen)
    expected = torch_ref.paged_attention(q, kv_cache, meta, 0.3, None)
    got = get_backend(backend).paged_attention(q, kv_cache, fresh(meta), 0.3, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
@pytest.mark.parametrize("window", [None, 5])
def test_traced_decode_attention_equals_reference(backend, kv_cache_dtype, window):
    """The attention of a compiled decode step (`decode_attention_traced`), run eagerly on tables padded
    the way the runner pads them, on the pages of every KV-cache dtype (with key scales where it has them)."""
    from effinfer.layers.attention import padded_block_tables

    gen = torch.Generator().manual_seed(3)
    seq_lens = [9, 3, 17, 1]
    meta = metadata([1] * len(seq_lens), seq_lens, gen)
    codec = get_kv_dtype(kv_cache_dtype)
    data = torch.zeros(2, KV_HEADS, NUM_BLOCKS, BLOCK, DIM, dtype=codec.storage_dtype(torch.float32))
    scales = torch.zeros(2, KV_HEADS, NUM_BLOCKS, BLOCK) if codec.has_scales else None
    key_scale = torch.rand(KV_HEADS, DIM, generator=gen) + 0.5 if codec.scales_keys else None
    kv_cache = PagedKVCache(data, scales, codec, key_scale)
    every_slot = torch.arange(NUM_BLOCKS * BLOCK)
    kv_cache.write(every_slot, *torch.randn(2, len(every_slot), KV_HEADS, DIM, generator=gen))
    q = kv_cache.scale_queries(torch.randn(len(seq_lens), HEADS, DIM, generator=gen))
    expected = torch_ref.paged_attention(q, kv_cache, meta, 0.3, window)
    decode = DecodeBatch(padded_block_tables(meta.block_tables, "cpu", min_blocks=2), torch.tensor(seq_lens))
    got = get_backend(backend).decode_attention_traced(q, kv_cache, decode, 0.3, window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


in_place = pytest.mark.skipif(kernels.paged_decode_attention() is None,
                              reason="effinfer's paged attention kernel needs a C++ compiler and an AVX-512 CPU")


def big_metadata(query_lens, seq_lens, block, num_blocks, gen):
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots, starts = [], [], [0]
    for q_len, s_len in zip(query_lens, seq_lens):
        blocks = torch.tensor([perm.pop() for _ in range(-(-s_len // block))])
        tables.append(blocks)
        slots.append((blocks[:, None] * block + torch.arange(block)).flatten()[s_len - q_len:s_len])
        starts.append(starts[-1] + q_len)
    return AttentionMetadata(torch.cat(slots), starts, list(seq_lens), tables, block)


@in_place
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, dim, block", [(9, 3, 64, 16), (8, 2, 128, 32), (4, 4, 256, 8)])
@pytest.mark.parametrize("window", [None, 5, 300])
def test_in_place_kernel_equals_reference(dtype, tolerance, heads, kv_heads, dim, block, window):
    """effinfer's kernel reads the pages where they are (scattered tables, lengths across several of its
    256-token partitions, grouped-query heads, sliding windows), on a pure decode step and on a step that mixes
    decodes with prefill chunks (those take the reference path)."""
    gen = torch.Generator().manual_seed(heads + dim + (window or 0))
    num_blocks = 256
    pages = torch.randn(2, kv_heads, num_blocks, block, dim, generator=gen).to(dtype)
    reference = PagedKVCache(pages)
    kernel = PagedKVCache(pages, decode_kernel=kernels.paged_decode_attention())
    for query_lens, seq_lens in [([1] * 6, [1, 16, 17, 255, 700, 1030]), ([1, 7, 1], [520, 7, 3])]:
        meta = big_metadata(query_lens, seq_lens, block, num_blocks, gen)
        q = torch.randn(sum(query_lens), heads, dim, generator=gen).to(dtype)
        expected = torch_ref.paged_attention(q.float(), PagedKVCache(pages.float()), meta, 0.125, window)
        got = get_backend("torch_sdpa").paged_attention(q, kernel, fresh(meta), 0.125, window)
        torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=tolerance)
        if len(set(query_lens)) == 1:   # the compiled step's attention takes the same kernel
            from effinfer.layers.attention import padded_block_tables

            decode = DecodeBatch(padded_block_tables(meta.block_tables, "cpu", min_blocks=2), torch.tensor(seq_lens))
            traced = get_backend("torch_sdpa").decode_attention_traced(q, kernel, decode, 0.125, window)
            assert torch.equal(traced, got)
            unkerneled = get_backend("torch_sdpa").decode_attention_traced(q, reference, decode, 0.125, window)
            torch.testing.assert_close(unkerneled.float(), expected, atol=tolerance, rtol=tolerance)


@in_place
def test_in_place_kernel_refuses_what_it_cannot_read():
    op = kernels.paged_decode_attention()
    pages = torch.zeros(2, 2, 8, 16, 64)
    with pytest.raises(RuntimeError, match="within its table"):
        op(torch.zeros(1, 4, 64), pages, torch.tensor([[0, 1]]), torch.tensor([33]), 0.1, 0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(torch.zeros(1, 4, 64, dtype=torch.bfloat16), pages, torch.tensor([[0]]), torch.tensor([3]), 0.1, 0)
