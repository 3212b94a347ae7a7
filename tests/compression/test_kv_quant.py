"""8-bit KV pages: round trips, the batched backend against the reference on 8-bit pages, capacity."""

from __future__ import annotations

import pytest
import torch

from effinfer.compression.quant import kv_quant
from effinfer.layers.attention import AttentionMetadata, PagedKVCache
from effinfer.layers.attn_backends import get_backend
from effinfer import LLM, SamplingParams


@pytest.mark.parametrize("kind, tolerance", [("int8", 1 / 127), ("fp8", 1 / 8)])
def test_round_trip_error_is_bounded(kind, tolerance):
    x = torch.randn(5, 3, 64)
    values, scales = kv_quant.quantize(x, kind)
    assert values.element_size() == 1
    back = kv_quant.dequantize(values, scales, kind, torch.float32)
    assert ((back - x).abs() <= tolerance * x.abs().amax(-1, keepdim=True) + 1e-6).all()


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_backends_agree_on_8bit_pages(kind):
    torch.manual_seed(0)
    heads, q_heads, block, dim, num_blocks = 2, 4, 4, 16, 12
    seq_lens, query_lens = [9, 3, 14], [1, 3, 1]            # two decodes and a prompt of three
    tables = [torch.tensor([5, 0, 7]), torch.tensor([2]), torch.tensor([11, 3, 9, 1])]
    meta = lambda: AttentionMetadata(torch.tensor([0]), [0, 1, 4, 5], seq_lens, tables, block)  # noqa: E731
    cache = PagedKVCache(torch.zeros(2, heads, num_blocks, block, dim, dtype=kv_quant.storage_dtype(kind, torch.float32)),
                         torch.zeros(2, heads, num_blocks, block) if kind == "int8" else None, kind)
    full = PagedKVCache(torch.zeros(2, heads, num_blocks, block, dim))
    slots = torch.arange(num_blocks * block)
    k, v = torch.randn(len(slots), heads, dim), torch.randn(len(slots), heads, dim)
    cache.write(slots, k, v)
    full.write(slots, k, v)
    q = torch.randn(sum(query_lens), q_heads, dim)
    ref = get_backend("torch_ref")(q, cache, meta(), 0.25, None)
    fast = get_backend("torch_sdpa")(q, cache, meta(), 0.25, None)
    exact = get_backend("torch_ref")(q, full, meta(), 0.25, None)
    assert torch.allclose(ref, fast, atol=1e-5)
    assert 0 < (ref - exact).abs().max() < (0.05 if kind == "int8" else 0.3)


def test_int8_pages_hold_twice_the_tokens_and_decode_alike(smollm2_path):
    common = dict(show_progress=False, kv_cache_memory_gb=0.05, dtype="bfloat16")
    plain, int8 = LLM(str(smollm2_path), **common), LLM(str(smollm2_path), kv_cache_dtype="int8", **common)
    ratio = int8.engine.block_manager.num_blocks / plain.engine.block_manager.num_blocks
    assert 1.85 < ratio < 2.0          # 8-bit values plus one 16-bit scale per 64-value head vector
    params = SamplingParams(max_tokens=24, temperature=0.0)
    prompts = ["The history of Rome", "def fibonacci(n):", "List three colours:"]
    a = [r.token_ids for r in plain.generate(prompts, params, use_tqdm=False)]
    b = [r.token_ids for r in int8.generate(prompts, params, use_tqdm=False)]
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))
    assert same > 0.8
