"""Packs one step's scheduled tokens into a ragged batch, runs the model, returns last-token logits.

No padding: the step's tokens of all sequences are concatenated; `AttentionMetadata` tells attention
where each sequence starts and which cache slots it owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from effinfer.engine.compiled_decode import MAX_BATCH as COMPILED_MAX_BATCH
from effinfer.layers.attention import AttentionMetadata, DecodeBatch, padded_block_tables


@dataclass
class ScheduledSeq:
    """One sequence's work in a step: compute `token_ids` at positions `num_computed`, ... ."""

    token_ids: list[int]
    num_computed: int
    block_table: list[int]
    needs_logits: bool = True
    """Whether the last token's logits are wanted (False for a prompt chunk short of the prompt's end)."""
    all_logits: bool = False
    """Logits of every scheduled token (prompt logprobs), not only the last."""
    num_spec: int = 0
    """Draft tokens at the end of `token_ids`: their positions need logits too (verification)."""
    exit_threshold: float | None = None
    """A decode token may exit early when an exit head's confidence exceeds this (None: runs every layer)."""
    pooling: str | None = None
    """Embedding requests: pool the final hidden states of these tokens ("mean": their sum; "last": the last)."""

    @property
    def is_one_token_decode(self) -> bool:
        """One new token whose logits sample the next: what early exit and compiled steps can run."""
        return len(self.token_ids) == 1 and self.needs_logits and not self.all_logits and not self.num_spec


class ModelRunner:
    def __init__(self, model: nn.Module, block_size: int, device: torch.device | str, compiled_forward=None,
                 early_exit=None, kv_bindings: dict | None = None):
        self.model = model
        self.block_size = block_size
        self.device = torch.device(device)
        self.compiled_forward = compiled_forward
        """The model's forward compiled for decode steps (engine/compiled_decode.py), or None: eager."""
        self.decode_steps = "compiled" if compiled_forward is not None else "eager"
        """How decode steps run: eager, compiling (eager meanwhile), compiled, or eager (compile failed)."""
        self.early_exit = early_exit
        """An `EarlyExit` (decoding/early_exit.py: `forward(input_ids, positions, meta, seqs, logit_rows)`) when the
        engine has exit heads."""
        self.kv_bindings = kv_bindings
        """Pages (and backend) per attention module that this runner's steps use instead of the modules' own
        (`AttentionMetadata.kv_bindings`): a side model's."""

    failure: str | None = None
    """Why this runner can run no more steps (a tensor- or pipeline-parallel worker died), or None."""

    def close(self) -> None:
        """Release what the runner holds outside this process (parallel workers); nothing by default."""

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq], pooled: dict | None = None) -> torch.Tensor:
        """-> fp32 logits [num_logit_rows, vocab]: per sequence in order, all its rows if `all_logits`,
        else its last `num_spec + 1` rows if `needs_logits`, else none. Sequences with `pooling` put their
        pooled final hidden state (fp32) in `pooled`, by their index in `seqs`."""
        input_ids, positions, meta, logit_rows = self.prepare(seqs)
        if pooled is not None and any(seq.pooling for seq in seqs):
            hidden = self.model(input_ids, positions, meta)
            pool_hidden(hidden, seqs, meta.query_start_loc, pooled)
            return self.model.compute_logits(hidden[logit_rows])
        if self.early_exit is not None and any(seq.exit_threshold is not None for seq in seqs):
            return self.early_exit.forward(input_ids, positions, meta, seqs, logit_rows)
        if self.compiled_forward is not None and len(seqs) <= COMPILED_MAX_BATCH and all(map(_plain_decode, seqs)):
            meta.decode = DecodeBatch(padded_block_tables(meta.block_tables, self.device, min_blocks=2),
                                      torch.tensor(meta.seq_lens, device=self.device))
            hidden = self.compiled_forward(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
        return self.model.compute_logits(hidden[logit_rows])

    def prepare(self, seqs: list[ScheduledSeq]):
        ids, positions, slots, starts, seq_lens, tables = [], [], [], [0], [], []
        size = self.block_size
        for seq in seqs:
            seq_len = seq.num_computed + len(seq.token_ids)
            tables.append(self._table(seq.block_table, seq_len))
            ids.extend(seq.token_ids)
            positions.extend(range(seq.num_computed, seq_len))
            slots.extend(seq.block_table[p // size] * size + p % size for p in range(seq.num_computed, seq_len))
            starts.append(starts[-1] + len(seq.token_ids))
            seq_lens.append(seq_len)
        as_tensor = lambda x: torch.tensor(x, dtype=torch.long, device=self.device)  # noqa: E731
        meta = AttentionMetadata(as_tensor(slots), starts, seq_lens, tables, size, kv_bindings=self.kv_bindings)
        logit_rows = as_tensor([row for start, end, seq in zip(starts, starts[1:], seqs) for row in _logit_rows(start, end, seq)])
        return as_tensor(ids), as_tensor(positions), meta, logit_rows

    @staticmethod
    def num_logit_rows(seq: ScheduledSeq) -> int:
        return len(seq.token_ids) if seq.all_logits else (seq.num_spec + 1 if seq.needs_logits else 0)

    def _table(self, block_table: list[int], seq_len: int) -> torch.Tensor:
        """The blocks that hold positions 0..seq_len-1."""
        num_blocks = -(-seq_len // self.block_size)
        assert len(block_table) >= num_blocks, "scheduler must allocate blocks before the step"
        return torch.tensor(block_table[:num_blocks], dtype=torch.long, device=self.device)


def pool_hidden(hidden: torch.Tensor, seqs: list[ScheduledSeq], starts: list[int], pooled: dict) -> None:
    """Each pooling sequence's final hidden rows (`starts`: its first row) -> `pooled[index in seqs]` (fp32)."""
    for i, seq in enumerate(seqs):
        rows = hidden[starts[i]:starts[i + 1]].float()
        if seq.pooling == "mean":
            pooled[i] = rows.sum(dim=0)
        elif seq.pooling == "last":
            pooled[i] = rows[-1]


def _plain_decode(seq: ScheduledSeq) -> bool:
    """One token through every layer: what the compiled decode step runs."""
    return seq.is_one_token_decode and seq.exit_threshold is None


def _logit_rows(start: int, end: int, seq: ScheduledSeq) -> range:
    return range(end - ModelRunner.num_logit_rows(seq), end)
