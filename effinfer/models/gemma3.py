"""Gemma 3 (text): interleaved sliding-window and global attention layers, each with its own rope base;
RMSNorm on q and k; norms before and after both attention and MLP ("sandwich"); embeddings scaled by
sqrt(hidden_size); GeLU-tanh MLP; (1 + weight) RMSNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from effinfer.layers.attention import AttentionMetadata
from effinfer.layers.norm import GemmaRMSNorm
from effinfer.layers.rotary import RotaryEmbedding, apply_rotary
from effinfer.loader.arch_config import SLIDING_ATTENTION, ArchConfig
from effinfer.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel


class Gemma3Attention(LlamaAttention):
    def __init__(self, cfg: ArchConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, rope: tuple, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.split_qkv(hidden)
        q, k = apply_rotary(self.q_norm(q), *rope), apply_rotary(self.k_norm(k), *rope)
        return self.o_proj(self.attn(q, k, v, meta))

    def write_kv(self, hidden: torch.Tensor, rope: tuple, slot_mapping: torch.Tensor) -> None:
        _, k, v = self.split_qkv(hidden)
        self.attn.kv_cache.write(slot_mapping, apply_rotary(self.k_norm(k), *rope), v)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Gemma3Attention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, hidden: torch.Tensor, rope: tuple, meta: AttentionMetadata) -> torch.Tensor:
        attn_out = self.self_attn(self.input_layernorm(hidden), rope, meta)
        hidden = hidden + self.post_attention_layernorm(attn_out)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp_out)

    def write_kv(self, hidden: torch.Tensor, rope: tuple, slot_mapping: torch.Tensor) -> None:
        self.self_attn.write_kv(self.input_layernorm(hidden), rope, slot_mapping)

    @torch.no_grad()
    def key_magnitude(self) -> torch.Tensor:
        """Keys are RMS-normalized per head (k_norm): each channel's size is that norm's gain."""
        attn = self.self_attn
        return attn.k_norm(torch.ones_like(attn.k_norm.weight)[None]).float().abs().expand(attn.num_kv_heads, attn.head_dim)


class Gemma3ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ArchConfig):
        super().__init__(cfg)
        self.local_rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta)
        self.is_sliding = [t == SLIDING_ATTENTION for t in cfg.layer_types]

    def build_model(self, cfg: ArchConfig) -> nn.Module:
        return LlamaModel(cfg, layer_cls=Gemma3DecoderLayer, norm_cls=GemmaRMSNorm)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids)
        # HF rounds the normalizer to the activation dtype first; do the same so bf16 matches
        normalizer = torch.tensor(self.config.hidden_size ** 0.5, dtype=hidden.dtype)
        return hidden * normalizer

    def rope_for_layer(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple]:
        global_rope = self.rotary_emb(positions, dtype)
        local_rope = self.local_rotary_emb(positions, dtype)
        return [local_rope if sliding else global_rope for sliding in self.is_sliding]
