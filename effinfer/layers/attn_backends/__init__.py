"""Paged attention backends by name. `torch_ref` is the per-sequence oracle; `torch_sdpa` batches decodes."""

from __future__ import annotations

import importlib

_BACKENDS = {"torch_ref": "effinfer.layers.attn_backends.torch_ref",
             "torch_sdpa": "effinfer.layers.attn_backends.torch_sdpa"}


def get_backend(name: str):
    """The `paged_attention(q, k_cache, v_cache, meta, scale, sliding_window)` function of a backend."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; supported: {', '.join(_BACKENDS)}")
    return importlib.import_module(_BACKENDS[name]).paged_attention
