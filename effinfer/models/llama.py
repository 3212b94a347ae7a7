"""Llama family: Llama 2/3, SmolLM2, TinyLlama, Mistral, and Qwen2 (the same block with q/k/v bias).

Class names mirror transformers' so weights load by their HF names. Q/K/V and gate/up are fused into
one matmul each at load time: fewer, larger GEMMs and fewer dispatches per token.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from effinfer.layers.attention import Attention, AttentionMetadata
from effinfer.layers.norm import RMSNorm
from effinfer.layers.rotary import RotaryEmbedding, apply_rotary
from effinfer.loader.arch_config import SLIDING_ATTENTION, ArchConfig
from effinfer.models.interface import AfterLayer

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}

# HF name of a shard -> (fused parameter, shard index)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        is_sliding = cfg.layer_types[layer_idx] == SLIDING_ATTENTION
        scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, scale,
                              cfg.sliding_window if is_sliding else None)

    def split_qkv(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # hidden [num_tokens, hidden_size] -> q [T, H, D], k, v [T, H_kv, D]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        num_tokens = hidden.shape[0]
        return (q.view(num_tokens, self.num_heads, self.head_dim),
                k.view(num_tokens, self.num_kv_heads, self.head_dim),
                v.view(num_tokens, self.num_kv_heads, self.head_dim))

    def forward(self, hidden: torch.Tensor, rope: tuple, meta: AttentionMetadata) -> torch.Tensor:
        # [num_tokens, heads + 2 * kv_heads, head_dim]: q and k are neighbours, so one rotary call covers both
        qkv = self.qkv_proj(hidden).view(hidden.shape[0], -1, self.head_dim)
        qk = apply_rotary(qkv[:, :self.num_heads + self.num_kv_heads], *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        return self.o_proj(self.attn(q, k, qkv[:, self.num_heads + self.num_kv_heads:], meta))

    def write_kv(self, hidden: torch.Tensor, rope: tuple, slot_mapping: torch.Tensor) -> None:
        """Only write this layer's K/V of `hidden` into the cache (a token that exited early skips the rest)."""
        _, k, v = self.split_qkv(hidden)
        self.attn.kv_cache.write(slot_mapping, apply_rotary(k, *rope), v)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, rope: tuple, meta: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), rope, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

    def write_kv(self, hidden: torch.Tensor, rope: tuple, slot_mapping: torch.Tensor) -> None:
        self.self_attn.write_kv(self.input_layernorm(hidden), rope, slot_mapping)

    @torch.no_grad()
    def key_magnitude(self) -> torch.Tensor:
        """[num_kv_heads, head_dim] the size |k| reaches per channel, from the weights alone: the normalized
        input has unit RMS, so a key channel's standard deviation is about the norm of its weight row times the
        norm's gain; a token's largest channels reach ~3 of those, plus |bias| (a constant offset)."""
        attn = self.self_attn
        norm_weight = self.input_layernorm.weight
        gain = self.input_layernorm(torch.ones_like(norm_weight)[None]).float()
        rows = slice(attn.q_size, attn.q_size + attn.kv_size)
        magnitude = 3 * (dense_weight(attn.qkv_proj)[rows].float() * gain).norm(dim=-1)
        if attn.qkv_proj.bias is not None:
            magnitude = magnitude + attn.qkv_proj.bias[rows].float().abs()
        return magnitude.view(attn.num_kv_heads, attn.head_dim)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_cls=LlamaDecoderLayer, norm_cls=RMSNorm):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = norm_cls(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Returns final hidden states for the packed tokens; `compute_logits` projects the rows that sample."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.config = cfg
        self.model = self.build_model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def build_model(self, cfg: ArchConfig) -> nn.Module:
        return LlamaModel(cfg)

    def tie_weights(self) -> None:
        """Share the embedding with the output head; redone after `to_empty`, which unties parameters."""
        if self.config.tie_word_embeddings and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def rope_for_layer(self, positions: torch.Tensor, dtype: torch.dtype) -> list[tuple]:
        rope = self.rotary_emb(positions, dtype)
        return [rope] * len(self.model.layers)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                layer_ids: Sequence[int] | None = None, after_layer: AfterLayer | None = None) -> torch.Tensor:
        """The one decoder loop: embed, the layers `layer_ids` (default all, in order), the final norm.
        `after_layer(index, hidden, ropes)` runs after each layer; when it returns True the loop stops there
        (early exit). A layer subset is a self-speculation draft. Plain calls stay traceable by torch.compile."""
        # input_ids, positions [num_tokens] -> hidden [num_tokens, hidden_size]
        hidden = self.embed(input_ids)
        ropes = self.rope_for_layer(positions, hidden.dtype)   # one per layer of the full model
        layers = self.model.layers
        chosen = list(enumerate(layers)) if layer_ids is None else [(index, layers[index]) for index in layer_ids]
        for index, layer in chosen:
            hidden = layer(hidden, ropes[index], meta)
            if after_layer is not None and after_layer(index, hidden, ropes):
                break
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    @staticmethod
    def fused_target(name: str) -> tuple[str, int | None]:
        """HF tensor name -> (name of the fused parameter that holds it, shard index or None)."""
        return _fused_target(name)

    def checkpoint_shards(self, module_name: str) -> list[tuple[str, int]]:
        """(HF weight name, rows) of each checkpoint tensor that a (fused) linear layer holds, in order."""
        fused = [(shard, index) for shard, (f, index) in STACKED_PARAMS.items() if module_name.endswith("." + f)]
        if not fused:
            return [(f"{module_name}.weight", dict(self.named_modules())[module_name].out_features)]
        base = module_name.rpartition(".")[0]
        sizes = _shard_sizes(self, module_name)
        return [(f"{base}.{shard}.weight", sizes[index]) for shard, index in sorted(fused, key=lambda t: t[1])]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; every parameter must be filled exactly once."""
        params = dict(self.named_parameters(remove_duplicate=False))
        modules = dict(self.named_modules())
        filled: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # tied: the embedding already holds it
            target, shard = _fused_target(name)
            module_name, _, attr = target.rpartition(".")
            module = modules.get(module_name)
            if attr == "weight" and hasattr(module, "load_weight"):   # a quantized layer takes it shard by shard
                module.load_weight(tensor, 0 if shard is None else sum(_shard_sizes(self, name)[:shard]))
            elif target in params:
                _copy_shard(params[target], tensor, shard, name, self)
            else:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            filled.add(name)
        missing = _expected_names(self) - filled
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The [out, in] weight a (possibly quantized) linear layer computes with."""
    method = getattr(linear, "method", None)
    return method.dequantize(linear) if method is not None else linear.weight


def _fused_target(name: str) -> tuple[str, int | None]:
    for shard_name, (fused, index) in STACKED_PARAMS.items():
        if f".{shard_name}." in name:
            return name.replace(shard_name, fused), index
    return name, None


def _copy_shard(param: nn.Parameter, tensor: torch.Tensor, shard: int | None, name: str, model) -> None:
    if shard is None:
        dest = param.data
    else:
        sizes = _shard_sizes(model, name)
        dest = param.data.narrow(0, sum(sizes[:shard]), sizes[shard])
    if dest.shape != tensor.shape:
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(dest.shape)}")
    dest.copy_(tensor)


def _shard_sizes(model, name: str) -> list[int]:
    cfg = model.config
    if ".mlp." in name:
        return [cfg.intermediate_size, cfg.intermediate_size]
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return [q, kv, kv]


def _expected_names(model) -> set[str]:
    """HF names that a complete checkpoint must provide (fused parameters expanded into their shards)."""
    names = set()
    quantized = [f"{n}.weight" for n, m in model.named_modules() if hasattr(m, "load_weight")]
    for name in [n for n, _ in model.named_parameters()] + quantized:
        fused = [(s, f) for s, (f, _) in STACKED_PARAMS.items() if f".{f}." in name]
        names.update(name.replace(f, s) for s, f in fused) if fused else names.add(name)
    if model.config.tie_word_embeddings:
        names.discard("lm_head.weight")
    return names


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: the Llama block with bias on q/k/v (set by `attention_bias` in the config)."""


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: the Llama block, optionally with a sliding window on every layer (from the config)."""
