"""A pipeline-parallel step: the step's sequences go through the stages as micro-batches, point to point.

Every rank has the step's `ScheduledSeq` list (the driver broadcasts it) and cuts it into the same micro-batches
(`split_microbatches`), so each knows the shape of every message and none is sent. For micro-batch i, rank 0 (the
first stage) embeds the tokens and runs its layers, sends the hidden state [tokens, hidden] to rank 1 and goes on
with micro-batch i + 1 while rank 1 computes i; each stage sends on to the next; the last applies the final norm and
sends rank 0 the rows it needs (those that give logits; every row when a sequence pools an embedding), from which
rank 0 computes the logits with its head. Every rank posts its receives before it computes, so a send never waits
for the next stage to be ready, only a stage's compute waits for its input. Messages are tagged with the micro-batch
index, and travel as CPU tensors on gloo whatever the device: NCCL runs a pair's sends and receives in order on one
stream, where receives posted ahead of sends would deadlock two stages that send to each other.

Each micro-batch has its own `AttentionMetadata` (`ModelRunner.prepare` of its sequences); the layers write their
K/V into the stage's own pages under the block ids the scheduler gave (every stage allocated the same pool).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from effinfer.distributed.stages import Stage
from effinfer.engine.model_runner import ModelRunner, ScheduledSeq, pool_hidden


def split_microbatches(seqs: list[ScheduledSeq], count: int) -> list[range]:
    """Up to `count` contiguous, non-empty runs of `seqs` (as index ranges) with near-equal token counts. Tokens
    [500, 1, 1, 1] in 2: [0:1], [1:4]; [1] * 8 in 3: [0:3], [3:6], [6:8]."""
    sizes = [len(seq.token_ids) for seq in seqs]
    total, bounds, running = sum(sizes), [0], 0
    for index, size in enumerate(sizes[:-1], start=1):
        running += size
        if len(bounds) < count and running * count >= total * len(bounds):
            bounds.append(index)
    return [range(start, stop) for start, stop in zip(bounds, bounds[1:] + [len(seqs)])] if seqs else []


class Received:
    """A hidden state on its way from another rank into a buffer of the shape every rank knows."""

    def __init__(self, rows: int, hidden_size: int, dtype: torch.dtype, device: torch.device, source: int, tag: int):
        self.buffer, self.device = torch.empty(rows, hidden_size, dtype=dtype), device
        self.work = dist.irecv(self.buffer, src=source, tag=tag) if rows else None

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        return self.buffer.to(self.device)


class PipelineStage:
    """One rank's part of every pipelined step: the driver's (which returns the logits) and each worker's."""

    def __init__(self, runner: ModelRunner, num_microbatches: int, dtype: torch.dtype):
        self.runner, self.model = runner, runner.model
        self.stage: Stage = runner.model.pipeline_stage
        self.num_microbatches, self.dtype = num_microbatches, dtype

    @torch.inference_mode()
    def execute(self, seqs: list[ScheduledSeq], pooled: dict | None = None) -> torch.Tensor | None:
        """Run this stage on each micro-batch of the step. On rank 0 -> the logits (and `pooled` vectors) exactly as
        `ModelRunner.execute` gives them; on the other ranks -> None."""
        batches = split_microbatches(seqs, self.num_microbatches)
        prepared = [self.runner.prepare([seqs[i] for i in batch]) for batch in batches]
        inbox = [self._receive(tag, ids, logit_rows, pooled is not None)
                 for tag, (ids, _, _, logit_rows) in enumerate(prepared)]
        sent = [self._send(self._forward(inputs, received, pooled is not None), tag)
                for tag, (inputs, received) in enumerate(zip(prepared, inbox))]
        for work, _ in filter(None, sent):
            work.wait()
        if not self.stage.is_first:
            return None
        return self._logits(seqs, batches, prepared, inbox, pooled)

    def _receive(self, tag: int, ids: torch.Tensor, logit_rows: torch.Tensor, all_rows: bool) -> Received:
        """Post the receive of micro-batch `tag`'s input: from the stage before, or on rank 0 the last stage's
        final rows."""
        stage, rows = self.stage, len(ids)
        if stage.is_first and not all_rows:
            rows = len(logit_rows)
        source = stage.size - 1 if stage.is_first else stage.rank - 1
        return Received(rows, self.model.config.hidden_size, self.dtype, self.runner.device, source, tag)

    def _forward(self, inputs: tuple, received: Received, all_rows: bool) -> torch.Tensor:
        """One micro-batch through this stage -> what it sends on: [num_tokens, hidden_size], or from the last stage
        the final-normed rows rank 0 needs."""
        ids, positions, meta, logit_rows = inputs
        hidden = self.model.embed(ids) if self.stage.is_first else received.wait()
        ropes = self.model.rope_for_layer(positions, hidden.dtype)   # one per local layer, at absolute positions
        for layer, rope in zip(self.model.model.layers, ropes):
            hidden = layer(hidden, rope, meta)
        if not self.stage.is_last:
            return hidden
        hidden = self.model.model.norm(hidden)
        return hidden if all_rows else hidden[logit_rows]

    def _send(self, hidden: torch.Tensor, tag: int):
        """(work, tensor) of the send to the next rank (the last stage's goes to rank 0); None for no rows."""
        if not hidden.numel():
            return None
        tensor = hidden.to("cpu", self.dtype).contiguous()     # kept until the send completes
        return dist.isend(tensor, dst=(self.stage.rank + 1) % self.stage.size, tag=tag), tensor

    def _logits(self, seqs: list[ScheduledSeq], batches: list[range], prepared: list, inbox: list[Received],
                pooled: dict | None) -> torch.Tensor:
        """Rank 0: the last stage's rows of each micro-batch, in order -> logits (and pooled vectors by index)."""
        logits = []
        for batch, (_, _, meta, logit_rows), received in zip(batches, prepared, inbox):
            hidden = received.wait()
            if pooled is not None:
                vectors: dict = {}
                pool_hidden(hidden, [seqs[i] for i in batch], meta.query_start_loc, vectors)
                pooled.update({batch.start + i: vector for i, vector in vectors.items()})
                hidden = hidden[logit_rows]
            logits.append(self.model.compute_logits(hidden))
        return torch.cat(logits)
