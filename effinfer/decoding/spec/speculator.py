"""The speculator: what speculative decoding adds to an engine step, behind two hooks the engine calls.

- `propose(running, max_model_len)` before the step is scheduled: each request that decodes gets up to k
  draft tokens from the proposer in `request.spec_ids` (none when more than `max_batch` requests decode:
  verifying drafts in a full batch costs more than it saves). The scheduler then schedules them as extra
  tokens of the step.
- `verify(request, rows_logits)` after the forward, for a request that had drafts: accepts a prefix by
  rejection sampling against the request's final distribution (`verify.py`; exact prefix matching when
  greedy), adapts the request's next draft length (one more after a full accept, else accepted + 1)
  and counts drafts and acceptances in `stats`.

Requests are the engine's (`prompt_ids`, `output_ids`, `all_ids`, `num_tokens`, `params`, `generator`,
`spec_ids`, `num_spec_tokens`); the speculator only reads and sets those fields.
"""

from __future__ import annotations

import torch

from effinfer.decoding.sampler import SamplingRow, final_probs, gather_logprobs
from effinfer.decoding.spec import DraftRequest, Proposer
from effinfer.decoding.spec.verify import verify


class Speculator:
    def __init__(self, proposer: Proposer, num_speculative_tokens: int, max_batch: int):
        self.proposer = proposer
        self.num_speculative_tokens = num_speculative_tokens
        """Most draft tokens per request per step."""
        self.max_batch = max_batch
        """Speculate only while at most this many requests decode."""
        self.stats = {"draft_tokens": 0, "accepted_tokens": 0, "verify_steps": 0}
        """Drafts proposed, drafts accepted, request-steps that verified."""

    def propose(self, running: list, max_model_len: int) -> None:
        """Set `spec_ids` of the running requests that decode one token this step."""
        decoding = [r for r in running
                    if r.num_tokens - r.num_computed_tokens == 1 and r.params.prompt_logprobs is None]
        if len(decoding) > self.max_batch:
            return
        batch = []
        for request in decoding:
            k = request.num_spec_tokens or self.num_speculative_tokens
            room = min(request.params.max_tokens - len(request.output_ids), max_model_len - request.num_tokens) - 1
            batch.append(DraftRequest(request.request_id, request.all_ids, max(0, min(k, room))))
        for request, drafts in zip(decoding, self.proposer.propose_batch(batch)):
            request.spec_ids = drafts

    def verify(self, request, rows_logits: torch.Tensor, constrain=None) -> tuple[list[int], list]:
        """-> (the accepted drafts plus one corrected or bonus token, their logprobs). `constrain(logits)` masks
        a copy of the rows in place (structured output); logprobs stay those of the raw rows."""
        drafts = request.spec_ids
        contexts = [SamplingRow.of(request, request.output_ids + drafts[:j]) for j in range(len(drafts) + 1)]
        masked = rows_logits
        if constrain is not None:
            masked = rows_logits.clone()
            constrain(masked)
        tokens = verify(final_probs(masked, contexts), drafts, request.generator)
        self.proposer.observe(request.request_id, request.num_tokens, drafts, rows_logits)
        accepted = len(tokens) - 1
        self.stats["draft_tokens"] += len(drafts)
        self.stats["accepted_tokens"] += accepted
        self.stats["verify_steps"] += 1
        k_max = self.num_speculative_tokens
        request.num_spec_tokens = min(k_max, len(drafts) + 1) if accepted == len(drafts) else max(1, accepted + 1)
        raw = torch.log_softmax(rows_logits, dim=-1) if request.params.logprobs is not None else None
        rows = contexts[:len(tokens)]
        return tokens, gather_logprobs(raw[:len(tokens)] if raw is not None else None, torch.tensor(tokens), rows)

    def release(self, request_id: str) -> None:
        self.proposer.release(request_id)
