"""KV-cache quantization: 8-bit pages hold twice the tokens of 16-bit ones in the same memory.

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

KV_CACHE_DTYPES = ("auto", "int8", "fp8")


def has_scales(kind: str) -> bool:
    return kind == "int8"


def storage_dtype(kind: str, model_dtype: torch.dtype) -> torch.dtype:
    return {"auto": model_dtype, "int8": torch.int8, "fp8": torch.uint8}[kind]


def quantize(x: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [..., head_dim] -> (stored values, per-vector scales or None)."""
    if kind == "int8":
        scale = x.abs().amax(-1).clamp(min=1e-6).float() / 127
        return torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale.to(x.dtype)
    if kind == "fp8":
        return x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8), None
    return x, None


def key_channel_scales(magnitude: torch.Tensor) -> torch.Tensor:
    """[num_kv_heads, head_dim] expected |k| per channel -> divisors that even the channels out (mean 1).
    Rotary pairs share one (the max): rotation moves magnitude between channels i and i + head_dim / 2."""
    half = magnitude.shape[-1] // 2
    pair = torch.maximum(magnitude[..., :half], magnitude[..., half:]).float().clamp(min=1e-6)
    scale = torch.cat((pair, pair), dim=-1)
    return scale / scale.mean(dim=-1, keepdim=True)


def dequantize(values: torch.Tensor, scales: torch.Tensor | None, kind: str, dtype: torch.dtype) -> torch.Tensor:
    if kind == "int8":
        return values.to(dtype) * scales[..., None].to(dtype)
    if kind == "fp8":
        return values.view(torch.float8_e4m3fn).to(dtype)
    return values.to(dtype)
