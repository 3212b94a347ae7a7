"""What the engine, the loaders and the techniques need of a model: `CausalLM` for the whole network,
`DecoderStack` for its `model` attribute and `DecoderLayer` for each decoder block.

To add an architecture: implement these (subclassing `LlamaForCausalLM` is the short way: override
`build_model`, `embed` or `rope_for_layer` where the family differs, as models/gemma3.py does), add one
line to models/registry.py, and add a tiny-model entry to the parity test (tests/models/test_parity_tiny.py).
The classes are `nn.Module`s whose parameters carry their Hugging Face names (fused q/k/v and gate/up
aside), so that checkpoints, quantization and pruning address them by name. Both protocols are
runtime-checkable: `isinstance(model, CausalLM)` checks that every member is present (not its signature).
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from effinfer.layers.attention import AttentionMetadata
from effinfer.loader.arch_config import ArchConfig

Rope = tuple
"""A layer's rotary tables as `apply_rotary(x, *rope)` takes them (cos, sin for the step's positions)."""

AfterLayer = Callable[[int, torch.Tensor, list], bool]
"""`after_layer(index, hidden, ropes)`, called by `CausalLM.forward` after each layer it runs; True stops there."""


@runtime_checkable
class DecoderLayer(Protocol):
    """One pre-norm decoder block: attention then MLP, each with a residual connection."""

    self_attn: nn.Module
    """Holds `attn` (the paged `Attention` whose `kv_cache` and `backend` the engine binds), `qkv_proj`
    (fused q/k/v linear), `o_proj`, and `num_heads`, `num_kv_heads`, `head_dim`, `q_size`, `kv_size`."""
    mlp: nn.Module
    """Holds `gate_up_proj` (fused gate/up linear) and `down_proj`: pruning and quantization edit them."""
    input_layernorm: nn.Module
    """The norm in front of `self_attn` (AWQ folds input scales into its weight)."""
    post_attention_layernorm: nn.Module
    """The norm after attention (in front of the MLP unless the layer has a `pre_feedforward_layernorm`)."""

    def forward(self, hidden: torch.Tensor, rope: Rope, meta: AttentionMetadata) -> torch.Tensor:
        """Run the block on the step's packed tokens, writing their K/V into the layer's cache.
        hidden [num_tokens, hidden_size] -> [num_tokens, hidden_size]."""
        ...

    def write_kv(self, hidden: torch.Tensor, rope: Rope, slot_mapping: torch.Tensor) -> None:
        """Only project and write the K/V of `hidden` [num_tokens, hidden_size] (the block's input) into
        the cache slots `slot_mapping` [num_tokens]: early exit fills the layers a token skipped."""
        ...

    def key_magnitude(self) -> torch.Tensor:
        """[num_kv_heads, head_dim] the size a key channel reaches, from the weights alone: the int8 KV
        cache divides keys by it per channel (a layer without it gets no key scales)."""
        ...


@runtime_checkable
class DecoderStack(Protocol):
    """`CausalLM.model`: the embedding, the decoder layers and the final norm (HF's `LlamaModel`)."""

    embed_tokens: nn.Module
    """Token id -> [hidden_size]; may be replaced by a quantized embedding tied to `lm_head`."""
    layers: nn.ModuleList
    """The `DecoderLayer`s in order; layer pruning replaces this list with a shorter one."""
    norm: nn.Module
    """The final norm, applied to the last layer's output (exit heads copy it)."""


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model over the packed tokens of a step (no batch dimension, no padding)."""

    config: ArchConfig
    """The architecture's hyperparameters; pruning updates `num_layers` and `intermediate_size` in place."""
    model: DecoderStack
    lm_head: nn.Module
    """[hidden_size] -> [vocab_size] linear (quantization may swap it for a quantized one)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [num_tokens] -> [num_tokens, hidden_size] the first layer's input (scaled where the
        family scales it)."""
        ...

    def rope_for_layer(self, positions: torch.Tensor, dtype: torch.dtype) -> list[Rope]:
        """positions [num_tokens] -> one rotary table per layer of `model.layers`, in order (layers of one
        kind may share a table; if the choice depends on per-layer state, layer pruning must keep it in step)."""
        ...

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                layer_ids: Sequence[int] | None = None, after_layer: AfterLayer | None = None) -> torch.Tensor:
        """The decoder loop: embed, the layers `layer_ids` (default all, in order), the final norm.
        `after_layer(index, hidden, ropes)` runs after each layer; returning True stops the loop there.
        input_ids, positions [num_tokens] -> final-normed hidden [num_tokens, hidden_size]."""
        ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_rows, hidden_size] (final-normed) -> fp32 logits [num_rows, vocab_size]."""
        ...

    @staticmethod
    def fused_target(name: str) -> tuple[str, int | None]:
        """HF tensor name -> (the parameter that holds it, its shard index in a fused one, else None).
        Called on the class, before a model is built (GGUF quantization plans)."""
        ...

    def checkpoint_shards(self, module_name: str) -> list[tuple[str, int]]:
        """(HF weight name, rows) of each checkpoint tensor a (fused) linear layer holds, in order."""
        ...

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the parameters; fail on an unknown name, a wrong shape or a gap."""
        ...

    def tie_weights(self) -> None:
        """Share the embedding with `lm_head` when the config ties them (redone after `to_empty`)."""
        ...
