"""Paged attention backends by name: `ATTENTION_BACKENDS` (name -> module and what it does), `get_backend`.

A backend is a module with the two functions of `AttentionBackend`: `paged_attention` for eager steps and
`decode_attention_traced` for the compiled decode steps of engine/compiled_decode.py. `get_backend` hands
them out as a `Backend` (plain function references: a model holding one can still be deep-copied).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:   # the table is read by configs and the CLI, which import no torch
    import torch


class AttentionBackend(Protocol):
    def paged_attention(self, q: torch.Tensor, kv_cache, meta, scale: float,
                        sliding_window: int | None) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim] of one step's packed batch (`AttentionMetadata` meta) over the
        layer's `PagedKVCache` -> [num_tokens, num_heads, head_dim]."""

    def decode_attention_traced(self, q: torch.Tensor, kv_cache, decode, scale: float,
                                sliding_window: int | None) -> torch.Tensor:
        """A pure decode step (`DecodeBatch` decode: row i is sequence i) written for `torch.compile`:
        tensors only, no Python lists or caches. q and the result [num_seqs, num_heads, head_dim]."""


class BackendInfo(NamedTuple):
    module: str
    description: str


ATTENTION_BACKENDS: dict[str, BackendInfo] = {
    "torch_ref": BackendInfo("effinfer.layers.attn_backends.torch_ref",
                             "one PyTorch SDPA call per sequence over its gathered slots: the oracle"),
    "torch_sdpa": BackendInfo("effinfer.layers.attn_backends.torch_sdpa",
                              "a step's decodes batched by length bucket over whole blocks; prefill chunks as torch_ref"),
}


@dataclass(frozen=True)
class Backend:
    """The functions of one registered backend (see `AttentionBackend`)."""

    name: str
    paged_attention: Callable
    decode_attention_traced: Callable


def get_backend(name: str) -> Backend:
    """The backend registered as `name` (its module imported on first use)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; supported: {', '.join(ATTENTION_BACKENDS)}")
    module = importlib.import_module(ATTENTION_BACKENDS[name].module)
    return Backend(name, module.paged_attention, module.decode_attention_traced)
