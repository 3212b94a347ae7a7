"""Megatron-style tensor parallelism for the Llama block family (Llama, Mistral, Qwen2, Gemma 3).

Each rank holds a slice of every large matrix and computes on it:
- q/k/v and gate/up are split by output rows (whole attention heads, whole MLP columns): no communication;
- o_proj and down_proj are split by input columns (the same heads, the same MLP columns): each rank's product
  is a partial sum, so one all-reduce per attention block and one per MLP block makes it whole;
- the embedding and the output head are split by vocabulary rows: a lookup is masked to the rank's rows and
  all-reduced, logits are all-gathered.
Norms, rotary tables and everything per token are replicated.

The split happens on the checkpoint's tensors as they stream in, before a layer is built or quantized, so a
rank never holds the whole model and quantized layers (int8, int4, a GGUF file's 4-bit blocks) split along the
same lines. KV heads follow their query heads; when there are more ranks than KV heads, each KV head is
replicated on the ranks that share its query heads (GQA).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import torch
import torch.distributed as dist
from torch import nn

from effinfer.loader.arch_config import ArchConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM")
ALIGN = 32
"""Split points inside a matrix's input dimension fall on multiples of this where the size allows: a GGUF 4-bit
block and effinfer's int4 group are 32 values along the input, so a split there cuts no block."""

COLUMN_SPLIT = ("o_proj", "down_proj")
VOCAB_SPLIT = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class Shard:
    """Which slice of the model one rank of `size` holds."""

    rank: int
    size: int
    q_heads: range
    kv_heads: range
    mlp_columns: range
    vocab_rows: range
    vocab_per_rank: int
    """Rows of every rank's embedding/head slice (the last rank's is padded with zero rows to this)."""
    head_dim: int

    @classmethod
    def plan(cls, cfg: ArchConfig, rank: int, size: int) -> "Shard":
        check_splittable(cfg, size)
        q_heads, kv_heads = _head_ranges(cfg.num_heads, cfg.num_kv_heads, size, rank)
        vocab_per_rank = -(-cfg.vocab_size // size)
        vocab_start = rank * vocab_per_rank
        return cls(rank, size, q_heads, kv_heads, split_range(cfg.intermediate_size, size, rank, ALIGN),
                   range(vocab_start, min(cfg.vocab_size, vocab_start + vocab_per_rank)), vocab_per_rank, cfg.head_dim)

    def parallelize(self, model: nn.Module, vocab_size: int) -> nn.Module:
        return parallelize(model, self, vocab_size)

    def local_config(self, cfg: ArchConfig) -> ArchConfig:
        """The architecture of this rank's slice: the model class builds it as it builds the whole."""
        return dataclasses.replace(cfg, num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads),
                                   intermediate_size=len(self.mlp_columns), vocab_size=self.vocab_per_rank)

    def local_name(self, name: str) -> str:
        """Every rank holds every layer (a part of each), under its own name."""
        return name

    def weights(self, stream):
        """This rank's part of each (HF name, tensor) of the checkpoint stream, as it streams in."""
        return ((name, self.slice_tensor(name, tensor)) for name, tensor in stream)

    def slice_tensor(self, name: str, tensor):
        """This rank's part of the HF-named checkpoint tensor `name` (a tensor or 4-bit blocks)."""
        module = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else ""
        if name in VOCAB_SPLIT:
            return _pad_rows(_rows(tensor, self.vocab_rows), self.vocab_per_rank)
        if module in ("q_proj", "o_proj"):
            span = range(self.q_heads.start * self.head_dim, self.q_heads.stop * self.head_dim)
        elif module in ("k_proj", "v_proj"):
            span = range(self.kv_heads.start * self.head_dim, self.kv_heads.stop * self.head_dim)
        elif module in ("gate_proj", "up_proj", "down_proj"):
            span = self.mlp_columns
        else:
            return tensor                                   # norms and other per-token weights: replicated
        if module in COLUMN_SPLIT:
            return _columns(tensor, span) if name.endswith(".weight") else tensor
        return _rows(tensor, span)


def check_splittable(cfg: ArchConfig, size: int) -> None:
    """A clear error, before any loading, where `size` ranks cannot split this model."""
    if cfg.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"tensor parallelism supports {', '.join(SUPPORTED_ARCHITECTURES)}; "
                         f"this model is {cfg.architecture}")
    if size > cfg.num_heads:
        raise ValueError(f"tensor_parallel_size={size} exceeds the model's {cfg.num_heads} attention heads")
    if size > cfg.num_kv_heads and size % cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel_size={size} exceeds the model's {cfg.num_kv_heads} KV heads and is not a "
                         "multiple of them: each KV head must be replicated on the same number of ranks")


def _head_ranges(num_heads: int, num_kv_heads: int, size: int, rank: int) -> tuple[range, range]:
    """(query heads, KV heads) of `rank`: whole GQA groups while there are enough KV heads, else one KV head
    shared by several ranks, each with part of its query heads."""
    group = num_heads // num_kv_heads
    if size <= num_kv_heads:
        kv = split_range(num_kv_heads, size, rank)
        return range(kv.start * group, kv.stop * group), kv
    sharing = size // num_kv_heads
    kv_head = rank // sharing
    part = split_range(group, sharing, rank % sharing)
    return range(kv_head * group + part.start, kv_head * group + part.stop), range(kv_head, kv_head + 1)


def split_range(total: int, parts: int, index: int, unit: int = 1) -> range:
    """Part `index` of `parts` near-equal contiguous parts of range(total), cut at multiples of `unit` when
    `total` is one (else of 1)."""
    unit = unit if total % unit == 0 and total // unit >= parts else 1
    units = total // unit
    start = index * units // parts
    stop = (index + 1) * units // parts
    return range(start * unit, stop * unit)


def _rows(tensor, span: range):
    if hasattr(tensor, "map_rows"):
        return tensor.map_rows(lambda rows: rows[span.start:span.stop])
    return tensor[span.start:span.stop]


def _columns(tensor, span: range):
    """Input columns `span` of a [rows, cols] weight; 4-bit blocks are cut between their groups when the span
    allows, else dequantized first (the layer then quantizes its slice itself)."""
    if hasattr(tensor, "group_size"):
        g = tensor.group_size
        if span.start % g or span.stop % g:
            return tensor.dequantize()[:, span.start:span.stop]
        return dataclasses.replace(tensor, q=tensor.q[:, span.start:span.stop].contiguous(),
                                   scale=tensor.scale[:, span.start // g:span.stop // g].contiguous(),
                                   minimum=tensor.minimum[:, span.start // g:span.stop // g].contiguous())
    return tensor[:, span.start:span.stop]


def _pad_rows(tensor, rows: int):
    if hasattr(tensor, "dequantize"):
        tensor = tensor.dequantize()
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


# ---- the collectives the split model needs -------------------------------------------------------------
_shared_memory = None
"""The ranks' `shm.SharedMemoryComm` when they share a CPU host: the model's collectives go through it where a
tensor fits, else through torch.distributed."""


def use_shared_memory(comm) -> None:
    global _shared_memory
    _shared_memory = comm


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    if _shared_memory is not None and _shared_memory.fits(tensor):
        return _shared_memory.all_reduce(tensor)
    dist.all_reduce(tensor)
    return tensor


def all_gather_last(tensor: torch.Tensor) -> torch.Tensor:
    """The ranks' tensors side by side along the last axis, in rank order."""
    if _shared_memory is not None and _shared_memory.fits(tensor):
        parts = list(_shared_memory.all_gather(tensor.contiguous()))
    else:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=-1)


def _reduce_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return all_reduce(output)


class VocabParallelEmbedding(nn.Module):
    """Lookup in this rank's vocabulary rows: other ids give zero rows, and the all-reduce fills them in."""

    def __init__(self, local: nn.Module, shard: Shard):
        super().__init__()
        self.local, self.start, self.rows = local, shard.vocab_rows.start, shard.vocab_per_rank

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local_ids = ids - self.start
        outside = (local_ids < 0) | (local_ids >= self.rows)
        hidden = self.local(local_ids.masked_fill(outside, 0))
        return all_reduce(hidden.masked_fill(outside[:, None], 0))


class GatheredHead(nn.Module):
    """The output head on this rank's vocabulary rows; the ranks' logits are gathered into the whole vocabulary."""

    def __init__(self, local: nn.Module, shard: Shard, vocab_size: int):
        super().__init__()
        self.local, self.vocab_size = local, vocab_size

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.local(hidden))[..., :self.vocab_size]


def parallelize(model: nn.Module, shard: Shard, vocab_size: int) -> nn.Module:
    """Add the collectives to a loaded slice: an all-reduce after each o_proj and down_proj, the vocabulary
    split's masked lookup and gathered logits. Called after loading, so parameter names stay the checkpoint's."""
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in COLUMN_SPLIT:
            if getattr(module, "bias", None) is not None and shard.rank:
                module.bias.zero_()                   # a bias is added once, not once per rank
            module.register_forward_hook(_reduce_output)
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, shard)
    model.lm_head = GatheredHead(model.lm_head, shard, vocab_size)
    model.tensor_parallel = shard
    return model
