"""Block manager on toy shapes: exact block ids, reference counts, prefix hits and eviction order."""

from __future__ import annotations

from effinfer.engine.block_manager import BlockManager
from effinfer.engine.request import Request
from effinfer.sampling_params import SamplingParams


def req(tokens: list[int], rid: str = "r") -> Request:
    return Request(rid, list(tokens), SamplingParams())


def test_allocate_takes_lowest_free_ids_in_order():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req(range(10), "a")
    assert bm.allocate(a, 10) == [0, 1, 2]
    assert a.block_ids == [0, 1, 2]
    assert [bm.blocks[i].ref_count for i in range(4)] == [1, 1, 1, 0]
    assert bm.num_free_blocks == 5


def test_allocate_grows_only_when_a_block_fills():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req(range(3), "a")
    bm.allocate(a, 3)
    a.num_computed_tokens = 3
    assert bm.allocate(a, 1) == []          # token 4 fits in block 0
    a.num_computed_tokens = 4
    assert bm.allocate(a, 1) == [1]         # token 5 needs a new block


def test_allocate_returns_none_and_changes_nothing_when_full():
    bm = BlockManager(num_blocks=3, block_size=4)
    a, b = req(range(8), "a"), req(range(8), "b")
    bm.allocate(a, 8)
    assert bm.allocate(b, 8) is None
    assert b.block_ids == [] and bm.num_free_blocks == 1


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    bm.allocate(a, 9)
    bm.cache_full_blocks(a, 9)               # blocks 0 and 1 are full
    b = req([1, 2, 3, 4, 5, 6, 7, 8, 42], "b")
    hits = bm.find_cached_prefix(b)
    assert hits == [0, 1]
    assert bm.allocate(b, 1, hits) == [3]
    assert b.block_ids == [0, 1, 3]
    assert [bm.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]


def test_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req(range(8), "a")
    bm.allocate(a, 8)
    bm.cache_full_blocks(a, 8)
    assert bm.find_cached_prefix(req(range(8), "b")) == [0]   # not [0, 1]: token 8 must be computed


def test_different_first_block_means_no_hit_even_if_later_blocks_equal():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = req([1, 2, 3, 4, 5], "a")
    bm.allocate(a, 5)
    bm.cache_full_blocks(a, 5)
    assert bm.find_cached_prefix(req([9, 9, 3, 4, 5], "b")) == []   # chained hashes: prefix must match


def test_freed_blocks_stay_cached_until_evicted_lru_tail_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = req([1, 2, 3, 4, 5], "a")
    bm.allocate(a, 5)                        # blocks 0, 1, 2
    bm.cache_full_blocks(a, 5)
    bm.free(a)
    # free queue: 3 (never used), then a's blocks tail first: 2, 1, 0
    assert list(bm.free_queue) == [3, 2, 1, 0]
    assert all(b.ref_count == 0 for b in bm.blocks)
    c = req([7, 7, 7], "c")
    assert bm.allocate(c, 3) == [3, 2]       # evicts block 2 (a's tail), keeps a's prefix blocks
    b = req([1, 2, 3, 4, 9], "b")
    assert bm.find_cached_prefix(b) == [0, 1]
    assert bm.allocate(b, 1, [0, 1]) is None  # needs one more block: none left
    bm.free(c)
    assert bm.allocate(b, 1, [0, 1]) == [2]   # c's tail block (freed last-to-first) is taken first
    assert b.block_ids == [0, 1, 2]


def test_eviction_removes_the_hash():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = req([1, 2, 3], "a")
    bm.allocate(a, 3)
    bm.cache_full_blocks(a, 3)
    bm.free(a)
    d = req([5, 6, 7, 8], "d")
    bm.allocate(d, 4)                        # reuses both blocks, evicting a's cached block 0
    assert bm.find_cached_prefix(req([1, 2, 3], "e")) == []


def test_hit_counters():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = req(range(9), "a")
    bm.find_cached_prefix(a)
    bm.allocate(a, 9)
    bm.cache_full_blocks(a, 9)
    bm.find_cached_prefix(req(range(9), "b"))
    assert (bm.num_hit_tokens, bm.num_queried_tokens) == (8, 18)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = req(range(9), "a")
    bm.allocate(a, 9)
    bm.cache_full_blocks(a, 9)
    assert bm.find_cached_prefix(req(range(9), "b")) == []


def test_reset_forgets_free_blocks_only():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, b = req([1, 2, 3], "a"), req([7, 8, 9], "b")
    for r in (a, b):
        bm.allocate(r, 3)
        bm.cache_full_blocks(r, 3)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.find_cached_prefix(req([1, 2, 5], "c")) == []       # a's freed block forgotten
    assert bm.find_cached_prefix(req([7, 8, 5], "d")) == [2]      # b still holds its block
