"""Paged KV blocks: a free queue, reference counts, and prefix caching by chained block hashes.

A block holds `block_size` consecutive tokens of one sequence. A *full* block is identified by
`hash(parent block's hash, its tokens)`, so equal hashes mean equal whole prefixes. When a request
finishes, its blocks return to the free queue but keep their hash: a later request with the same
prefix takes them back (a hit) until they are reused for other tokens (eviction, least recently
freed first). Blocks are freed tail-first, so a prefix's last blocks are evicted before its first.

Example (block_size 2): prompt [5, 6, 7, 8, 9] -> full blocks [5, 6], [7, 8] with hashes h1 = H(None, (5, 6)),
h2 = H(h1, (7, 8)); a second request [5, 6, 7, 8, 1] finds h1 and h2 cached and computes only token 1.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from effinfer.engine.request import Request


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        """Blocks with no reference, the next to be reused first (LRU)."""
        self.cached: dict[int, int] = {}
        """block hash -> block id of every full block whose contents are known."""
        self.num_hit_tokens = 0
        self.num_queried_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids of the longest cached prefix of `request`, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        self._extend_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            if block_hash not in self.cached:
                break
            hits.append(self.cached[block_hash])
        self.num_queried_tokens += request.num_tokens
        self.num_hit_tokens += len(hits) * self.block_size
        return hits

    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> list[int] | None:
        """Give `request` the blocks to hold `num_new_tokens` more tokens (after any `cached_blocks`).
        Returns the new block ids, or None (changing nothing) when the pool cannot supply them."""
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        num_needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(request.block_ids) - len(cached_blocks)
        reusable_free = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_needed > self.num_free_blocks - reusable_free:
            return None
        for block_id in cached_blocks:
            self._acquire(block_id)
        new_ids = [self._take_free_block() for _ in range(max(num_needed, 0))]
        request.block_ids.extend([*cached_blocks, *new_ids])
        return new_ids

    def cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Register the blocks that `num_tokens` (computed by the end of this step) fill completely."""
        if not self.enable_prefix_caching:
            return
        self._extend_hashes(request)
        for i in range(min(num_tokens // self.block_size, len(request.block_hashes))):
            block = self.blocks[request.block_ids[i]]
            if block.block_hash is None:
                block.block_hash = request.block_hashes[i]
                self.cached.setdefault(block.block_hash, block.block_id)

    def free(self, request: Request) -> None:
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than taken"
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        request.block_ids = []

    def reset_prefix_cache(self) -> None:
        """Forget the cached contents of every free block (blocks in use keep theirs)."""
        for block_id in self.free_queue:
            block = self.blocks[block_id]
            if block.block_hash is not None and self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict: its old contents are about to be overwritten
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def _extend_hashes(self, request: Request) -> None:
        size = self.block_size
        if request.num_tokens // size <= len(request.block_hashes):
            return
        tokens = request.all_ids
        for i in range(len(request.block_hashes), len(tokens) // size):
            parent = request.block_hashes[i - 1] if i else None
            request.block_hashes.append(hash((parent, tuple(tokens[i * size:(i + 1) * size]))))
