"""Reference paged attention: gather each sequence's K/V from its slots, then PyTorch SDPA.

The oracle for any faster backend. One SDPA call per sequence; with a sliding window only the keys
that some query of this step can see are gathered. It has no traced formulation of its own: compiled
decode steps take the shared one of traced_decode.py (as torch_sdpa does), whichever backend is chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effinfer.layers.attn_backends.traced_decode import decode_attention_traced  # noqa: F401 (backend API)


def paged_attention(q: torch.Tensor, kv_cache, meta, scale: float, sliding_window: int | None) -> torch.Tensor:
    # q [num_tokens, num_heads, head_dim]; kv_cache: the layer's PagedKVCache
    out = torch.empty_like(q)
    for i in range(meta.num_seqs):
        attend_one(q, kv_cache, meta, i, scale, sliding_window, out)
    return out


def attend_one(q, kv_cache, meta, i: int, scale: float, sliding_window: int | None, out) -> None:
    """Attention of sequence i's new tokens over its cached context, written into its rows of `out`."""
    start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
    seq_len, query_len = meta.seq_lens[i], end - start
    kv_start = _first_visible_key(seq_len, query_len, sliding_window)
    slots = meta.context_slots(i)[kv_start:]
    k, v = kv_cache.gather_slots(slots, q.dtype)   # each [num_kv_heads, kv_len, head_dim]
    mask = _mask(meta, i, kv_start, sliding_window, q.device)
    is_causal = mask is None and query_len > 1
    group = q.shape[1] // k.shape[0]
    if group > 1:  # repeat KV heads ourselves: SDPA's enable_gqa falls back to its slow math kernel on CPU
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    # 4-D inputs: SDPA's fused CPU kernel only takes [batch, heads, tokens, head_dim]
    out[start:end] = F.scaled_dot_product_attention(
        q[start:end].transpose(0, 1)[None], k[None], v[None], attn_mask=mask, is_causal=is_causal,
        scale=scale)[0].transpose(0, 1)


def _first_visible_key(seq_len: int, query_len: int, window: int | None) -> int:
    """Position of the oldest key that the earliest query of this step may attend to."""
    if window is None:
        return 0
    return max(0, seq_len - query_len - window + 1)


def _mask(meta, i: int, kv_start: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean [query_len, kv_len] mask, or None where SDPA's own causal flag (or no mask) is exact."""
    seq_len = meta.seq_lens[i]
    query_len = meta.query_start_loc[i + 1] - meta.query_start_loc[i]
    fits_window = window is None or seq_len <= window
    if fits_window and (query_len == 1 or query_len == seq_len):
        return None
    key = (i, window)
    if key not in meta.mask_cache:
        q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
        k_pos = torch.arange(kv_start, seq_len, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window is not None:
            allowed &= q_pos - k_pos < window
        meta.mask_cache[key] = allowed
    return meta.mask_cache[key]
