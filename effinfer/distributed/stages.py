"""Pipeline parallelism's split: each rank holds one stage, a run of consecutive decoder layers.

Stages are near-even contiguous layer ranges in rank order; rank 0, the engine's process, holds the first (the
shorter one where they cannot be equal: it also embeds, computes the logits and samples). The model class builds a
stage from a local architecture that has only the stage's layers (`num_layers`, and `layer_types` sliced, so that a
Gemma 3 layer keeps its sliding or global attention and its rotary table), and the checkpoint is cut to the stage's
layers as it streams in, renamed to their local indices (`model.layers.{i}.` -> `model.layers.{i - first}.`).

The embedding, the final norm and the output head load on every stage: the model class creates them and
`load_weights` wants every parameter filled. After loading, the stages other than rank 0's let go of the embedding
and the head, which only rank 0 runs.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

from torch import nn

from effinfer.distributed.sharding import split_range
from effinfer.loader.arch_config import ArchConfig

LAYER_PREFIX = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Stage:
    """Which decoder layers one rank of `size` pipeline stages holds."""

    rank: int
    size: int
    layers: range
    """Absolute indices of the stage's layers in the whole model."""

    @classmethod
    def plan(cls, cfg: ArchConfig, rank: int, size: int) -> "Stage":
        check_stageable(cfg, size)
        return cls(rank, size, split_range(cfg.num_layers, size, rank))

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def local_config(self, cfg: ArchConfig) -> ArchConfig:
        """The architecture of this stage: its layers only, each with its own layer type."""
        return dataclasses.replace(cfg, num_layers=len(self.layers),
                                   layer_types=cfg.layer_types[self.layers.start:self.layers.stop])

    def local_name(self, name: str) -> str | None:
        """The stage's name for the whole model's module or tensor `name`; None for another stage's layer."""
        match = LAYER_PREFIX.match(name)
        if match is None:
            return name                               # embedding, final norm, head: loaded on every stage
        index = int(match[1])
        if index not in self.layers:
            return None
        return f"model.layers.{index - self.layers.start}.{name[match.end():]}"

    def weights(self, stream: Iterable[tuple[str, object]]) -> Iterator[tuple[str, object]]:
        """The checkpoint tensors this stage holds, under its own names."""
        for name, tensor in stream:
            local = self.local_name(name)
            if local is not None:
                yield local, tensor

    def parallelize(self, model: nn.Module, vocab_size: int) -> nn.Module:
        """After loading: later stages drop the embedding and the head (rank 0 embeds and computes the logits)."""
        if not self.is_first:
            model.model.embed_tokens = Dropped(f"the embedding (pipeline stage {self.rank} receives hidden states)")
            model.lm_head = Dropped(f"the output head (pipeline stage {self.rank}; rank 0 computes the logits)")
        model.pipeline_stage = self
        return model


def check_stageable(cfg: ArchConfig, size: int) -> None:
    """A clear error, before any weight is read, where `size` stages cannot split this model."""
    if size > cfg.num_layers:
        raise ValueError(f"pipeline_parallel_size={size} exceeds the model's {cfg.num_layers} decoder layers: "
                         "each stage needs one layer at least")


class Dropped(nn.Module):
    """Stands where a stage let go of a module it never runs."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args):
        raise AssertionError(f"not held here: {self.what}")
