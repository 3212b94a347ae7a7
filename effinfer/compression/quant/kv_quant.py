"""KV-cache dtypes as codecs: 8-bit pages hold twice the tokens of 16-bit ones in the same memory.

`effinfer.compression.quant.KV_CACHE_DTYPES` maps each kv_cache_dtype to its codec class (the `KVCodec`
interface of layers/attention.py); the engine allocates pages in the codec's storage dtype and hands the codec to
each layer's `PagedKVCache`, which quantizes on write and dequantizes on gather.

- auto: the model dtype, stored as computed (`AutoKV`, defined beside `PagedKVCache` as its default).
- int8: symmetric, one scale per token and KV head (the scale is 1/head_dim of the page's bytes, kept
  in the activation dtype); quantized when written, dequantized when a backend gathers the blocks.
  Keys are first divided by fixed per-channel scales (`key_channel_scales`, from the weights): a few
  channels with large offsets (Qwen2's key biases) would otherwise set every token's scale and leave
  the other channels a handful of levels (KIVI's observation that keys vary by channel; here the
  per-channel part is static, so pages keep one scale per token and no block is re-quantized).
- fp8: float8 e4m3 values (range +-448, 3 mantissa bits) with no scale, as vLLM's default fp8 cache;
  stored as raw bytes so copies and gathers work on every device.
"""

from __future__ import annotations

import torch



class Int8KV:
    """int8 values with one scale per token and KV head; keys divided by per-channel scales first."""

    name = "int8"
    has_scales = True
    scales_keys = True
    """Keys are divided by per-channel scales (`key_scales`, from the weights) before they are quantized."""

    def key_scales(self, magnitude: torch.Tensor) -> torch.Tensor:
        """[num_kv_heads, head_dim] expected |k| per channel (`DecoderLayer.key_magnitude`) -> key divisors."""
        return key_channel_scales(magnitude)

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.int8

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [..., head_dim] -> values [..., head_dim], scales [...]
        scale = x.abs().amax(-1).clamp(min=1e-6).float() / 127
        return torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale.to(x.dtype)

    def dequantize(self, values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return values.to(dtype) * scales[..., None].to(dtype)


class Fp8KV:
    """float8 e4m3 values (clamped to +-448), no scales, kept as uint8 bytes."""

    name = "fp8"
    has_scales = False
    scales_keys = False

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return torch.uint8

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8), None

    def dequantize(self, values: torch.Tensor, scales: None, dtype: torch.dtype) -> torch.Tensor:
        return values.view(torch.float8_e4m3fn).to(dtype)


def key_channel_scales(magnitude: torch.Tensor) -> torch.Tensor:
    """[num_kv_heads, head_dim] expected |k| per channel -> divisors that even the channels out (mean 1).
    Rotary pairs share one (the max): rotation moves magnitude between channels i and i + head_dim / 2."""
    half = magnitude.shape[-1] // 2
    pair = torch.maximum(magnitude[..., :half], magnitude[..., half:]).float().clamp(min=1e-6)
    scale = torch.cat((pair, pair), dim=-1)
    return scale / scale.mean(dim=-1, keepdim=True)
