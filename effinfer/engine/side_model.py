"""A second model beside the engine's, with its own paged KV cache and per-sequence state: what a draft
model (or the target's own layer subset) needs to propose tokens without recomputing the context.

`extend([(key, token_ids), ...])` makes the cache hold exactly `token_ids` for each key and returns the
logits after the last token of each. It reuses the longest common prefix with what the key's cache holds
and computes the rest, so rejected drafts roll back for free: the next call's ids diverge where they did.
All keys of a call run in one packed forward (the same `ModelRunner` as the engine's).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from effinfer.engine.block_manager import BlockManager
from effinfer.engine.kv_cache import attention_layers, new_kv_caches
from effinfer.engine.model_runner import ModelRunner, ScheduledSeq
from effinfer.layers.attn_backends import Backend, get_backend


@dataclass
class _Seq:
    """What BlockManager.allocate reads (`num_computed_tokens`, `block_ids`) plus the cached ids."""

    ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)

    @property
    def num_computed_tokens(self) -> int:
        return len(self.ids)


class SideModel:
    def __init__(self, model: nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, backend: Backend | None = None, max_len: int | None = None):
        self.model = model
        self.layers = attention_layers(model)
        self.caches = new_kv_caches(self.layers, num_blocks, block_size, dtype, device)
        backend = backend or get_backend("torch_ref")
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        # the attention modules may be shared with the target (self-speculation): every step of this runner
        # reads and writes this model's pages instead of theirs
        bindings = {id(layer): (cache, backend) for layer, cache in zip(self.layers, self.caches)}
        self.runner = ModelRunner(model, block_size, device, kv_bindings=bindings)
        self.max_len = min(max_len or 1 << 62, num_blocks * block_size)
        self.seqs: OrderedDict[str, _Seq] = OrderedDict()
        """Per key, least recently used first (evicted first when blocks run out)."""

    @torch.inference_mode()
    def extend(self, items: list[tuple[str, list[int]]]) -> list[torch.Tensor | None]:
        """-> per item, fp32 logits [vocab] after its last token, or None if it does not fit the cache."""
        seqs, in_call = [], {key for key, _ in items}
        for key, ids in items:
            seq = self.seqs.pop(key, None) or _Seq()
            self.seqs[key] = seq                         # most recently used
            keep = min(_common_prefix(seq.ids, ids), len(ids) - 1)   # recompute >= 1 token for its logits
            del seq.ids[keep:]
            if len(ids) > self.max_len or not self._allocate(seq, len(ids) - keep, in_call):
                self.release(key)
                continue
            seqs.append((key, seq, ids[keep:]))
        out = dict.fromkeys(key for key, _ in items)
        if seqs:
            logits = self.runner.execute([ScheduledSeq(new, len(seq.ids), seq.block_ids) for _, seq, new in seqs])
            for row, (key, seq, new) in enumerate(seqs):
                seq.ids.extend(new)
                out[key] = logits[row]
        return list(out.values())

    def release(self, key: str) -> None:
        seq = self.seqs.pop(key, None)
        if seq is not None:
            self.block_manager.free(seq)

    def _allocate(self, seq: _Seq, num_new: int, in_use: set[str]) -> bool:
        """Blocks for `num_new` more tokens, evicting the least recently used other sequences if needed."""
        while self.block_manager.allocate(seq, num_new) is None:
            victim = next((k for k in self.seqs if k not in in_use), None)
            if victim is None:
                return False
            self.release(victim)
        return True


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n                     # binary search on the first difference: list slices compare in C
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
