"""Rotary position embeddings (RoPE, Su et al. 2021) in the rotate-half layout that HF checkpoints use.

cos/sin are computed once per forward for the packed positions and shared by every layer that uses
the same rope base, so no per-layer table lookup and no table sized by the context length.
"""

import math

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_inv_freq()

    def reset_inv_freq(self) -> None:
        """(Re)compute the frequencies in fp32: after a meta-device build or a cast of the whole model."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.inv_freq.device)
        inv_freq = _apply_scaling(1.0 / (self.theta ** (exponent / self.head_dim)), self.scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions [num_tokens] -> cos, sin [num_tokens, 1, head_dim]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [num_tokens, num_heads, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _apply_scaling(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    if scaling is None:
        return inv_freq
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaling(inv_freq, scaling)
    if kind == "freq_factors":  # GGUF `rope_freqs.weight`: llama3 scaling precomputed as divisors
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device=inv_freq.device)
    raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3, freq_factors")


def _llama3_scaling(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth ramp between (as in the reference implementation)."""
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
