"""KV-cache dtypes: every codec's round trip, the backends against the reference on 8-bit pages, capacity,
key channel scales."""

from __future__ import annotations

import pytest
import torch

from effinfer.compression.quant import KV_CACHE_DTYPES, get_kv_dtype
from effinfer.compression.quant.kv_quant import Int8KV, key_channel_scales
from effinfer.layers.attention import AttentionMetadata, PagedKVCache
from effinfer.layers.attn_backends import ATTENTION_BACKENDS, get_backend, torch_ref
from effinfer import LLM, SamplingParams

ROUND_TRIP_BOUND = {"auto": 0.0, "int8": 1 / 254, "fp8": 1 / 16}
"""Largest |dequantize(quantize(x)) - x| as a fraction of the vector's largest |x| (for |x| <= 448): int8
rounds to half a step of amax / 127; e4m3 keeps 3 mantissa bits, a relative error of at most 2^-4."""


@pytest.mark.parametrize("kv_cache_dtype", KV_CACHE_DTYPES)
def test_round_trip_error_is_bounded(kv_cache_dtype):
    assert kv_cache_dtype in ROUND_TRIP_BOUND, "a new KV-cache dtype brings its round-trip bound"
    codec = get_kv_dtype(kv_cache_dtype)
    x = torch.randn(5, 3, 64, generator=torch.Generator().manual_seed(0)) * 4
    values, scales = codec.quantize(x)
    assert values.dtype == codec.storage_dtype(torch.float32) and (scales is not None) == codec.has_scales
    back = codec.dequantize(values, scales, torch.float32)
    if kv_cache_dtype == "auto":
        assert torch.equal(back, x)
    bound = ROUND_TRIP_BOUND[kv_cache_dtype] * x.abs().amax(-1, keepdim=True)
    assert ((back - x).abs() <= bound + 1e-6).all()


def test_unknown_kv_cache_dtype_lists_the_known():
    with pytest.raises(ValueError, match="supported: " + ", ".join(KV_CACHE_DTYPES)):
        get_kv_dtype("int4")


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("kind", ["int8", "int8-key-scale", "fp8"])
def test_backends_agree_on_8bit_pages(backend, kind):
    torch.manual_seed(0)
    heads, q_heads, block, dim, num_blocks = 2, 4, 4, 16, 12
    seq_lens, query_lens = [9, 3, 14], [1, 3, 1]            # two decodes and a prompt of three
    tables = [torch.tensor([5, 0, 7]), torch.tensor([2]), torch.tensor([11, 3, 9, 1])]
    meta = lambda: AttentionMetadata(torch.tensor([0]), [0, 1, 4, 5], seq_lens, tables, block)  # noqa: E731
    codec = get_kv_dtype(kind.split("-")[0])
    cache = PagedKVCache(torch.zeros(2, heads, num_blocks, block, dim, dtype=codec.storage_dtype(torch.float32)),
                         torch.zeros(2, heads, num_blocks, block) if codec.has_scales else None, codec)
    full = PagedKVCache(torch.zeros(2, heads, num_blocks, block, dim))
    if kind == "int8-key-scale":                # keys divided per channel before quantizing, multiplied back after
        cache.key_scale = key_channel_scales(torch.rand(heads, dim) * 4 + 0.1)
    slots = torch.arange(num_blocks * block)
    k, v = torch.randn(len(slots), heads, dim), torch.randn(len(slots), heads, dim)
    cache.write(slots, k, v)
    full.write(slots, k, v)
    q = torch.randn(sum(query_lens), q_heads, dim)
    ref = torch_ref.paged_attention(cache.scale_queries(q), cache, meta(), 0.25, None)
    fast = get_backend(backend).paged_attention(cache.scale_queries(q), cache, meta(), 0.25, None)
    exact = torch_ref.paged_attention(q, full, meta(), 0.25, None)
    assert torch.allclose(ref, fast, atol=1e-5)
    assert 0 < (ref - exact).abs().max() < (0.05 if codec.name == "int8" else 0.3)


def test_int8_pages_hold_twice_the_tokens_and_decode_alike(smollm2_path):
    common = dict(show_progress=False, kv_cache_memory_gb=0.05, dtype="bfloat16", quantization="none")
    plain, int8 = LLM(str(smollm2_path), **common), LLM(str(smollm2_path), kv_cache_dtype="int8", **common)
    ratio = int8.engine.block_manager.num_blocks / plain.engine.block_manager.num_blocks
    assert 1.85 < ratio < 2.0          # 8-bit values plus one 16-bit scale per 64-value head vector
    params = SamplingParams(max_tokens=24, temperature=0.0)
    prompts = ["The history of Rome", "def fibonacci(n):", "List three colours:"]
    a = [r.token_ids for r in plain.generate(prompts, params, use_tqdm=False)]
    b = [r.token_ids for r in int8.generate(prompts, params, use_tqdm=False)]
    same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))
    assert same > 0.8


def test_key_channel_scales_protect_keys_with_channel_offsets():
    """Keys with a few large per-channel offsets (Qwen2's key biases): dividing channels by their expected
    size (|offset| + 3 standard deviations) before per-token int8 cuts the mean round-trip error several-fold."""
    torch.manual_seed(0)
    heads, dim, tokens = 2, 64, 32
    offset = torch.zeros(heads, dim)
    offset[:, [3, 3 + dim // 2, 10]] = torch.tensor([40.0, -25.0, 30.0])
    k = torch.randn(tokens, heads, dim) + offset
    slots = torch.arange(tokens)
    errors = {}
    for name, key_scale in (("per-token", None), ("per-channel", key_channel_scales(offset.abs() + 3))):
        cache = PagedKVCache(torch.zeros(2, heads, 1, tokens, dim, dtype=torch.int8), torch.zeros(2, heads, 1, tokens),
                             Int8KV(), key_scale)
        cache.write(slots, k, k)
        back, _ = cache.gather_slots(slots, torch.float32)          # pages keep k / key_scale
        back = back * (key_scale[:, None, :] if key_scale is not None else 1)
        errors[name] = (back.transpose(0, 1) - k).pow(2).mean().item()
    assert errors["per-channel"] < errors["per-token"] / 4


def test_engine_key_scales_come_from_the_weights(tmp_path):
    """A tiny Qwen2 whose key biases are large in a few channels: the int8 engine's weight-derived key scales
    cut the round-trip error of the keys the model really computes."""
    from tests.tiny_models import save_tiny_folder

    hf = save_tiny_folder("qwen2", tmp_path)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.k_proj.bias[[1, 5, 17]] = torch.tensor([20.0, -30.0, 25.0])
    hf.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), kv_cache_dtype="int8", show_progress=False, kv_cache_memory_gb=0.02, dtype="float32")
    attn = llm.engine.model.model.layers[1].self_attn.attn
    keys = []
    hook = attn.register_forward_hook(lambda _m, args, _o: keys.append(args[1]))
    try:
        llm.score(list(range(3, 120)))
    finally:
        hook.remove()
    k, slots = keys[0], torch.arange(keys[0].shape[0])
    errors = []
    for key_scale in (attn.kv_cache.key_scale, None):
        cache = PagedKVCache(torch.zeros(2, k.shape[1], 1, len(slots), k.shape[2], dtype=torch.int8),
                             torch.zeros(2, k.shape[1], 1, len(slots)), Int8KV(), key_scale)
        cache.write(slots, k, k)
        back = cache.gather_slots(slots, torch.float32)[0] * (key_scale[:, None, :] if key_scale is not None else 1)
        errors.append((back.transpose(0, 1) - k).pow(2).mean().item())
    assert attn.kv_cache.key_scale.max() > 3 * attn.kv_cache.key_scale.min()
    assert errors[0] < errors[1] / 4
