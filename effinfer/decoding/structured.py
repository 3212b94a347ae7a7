"""Structured output in the engine: one llguidance matcher per constrained request, its token mask for each
step computed on a worker thread while the model runs (llguidance drops the GIL), the masks applied to the
step's logits as a vectorised bit unpack, the sampled tokens fed back, and speculative drafts cut to what the
grammar allows and verified under each position's mask.

Requests are the engine's; this reads `params.structured` and keeps the matcher in `request.matcher`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from effinfer.decoding.grammar import check_grammar, grammar_text


class StructuredOutputs:
    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self._llguidance = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                                eos_token=tokenizer.eos_token_ids)
        self.num_words = (vocab_size + 31) // 32
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="effinfer-grammar")

    def start(self, request) -> None:
        """Give a request its matcher; ValueError naming the problem if its grammar does not compile."""
        check_grammar(request.params.structured)
        matcher = self._llguidance.LLMatcher(self.tokenizer, grammar_text(request.params.structured), log_level=0)
        if matcher.is_error():
            raise ValueError(f"the structured output constraint cannot be compiled: {matcher.get_error()}")
        request.matcher = matcher

    # ---- one step ------------------------------------------------------------------------------------
    def masks_async(self, requests: list) -> Future | None:
        """Start computing the next-token masks of these requests (None for unconstrained ones) on the worker."""
        if not any(r.matcher is not None for r in requests):
            return None
        return self.worker.submit(self.masks, requests)

    def masks(self, requests: list) -> torch.Tensor:
        """One row of mask bits per request, all ones for the unconstrained."""
        masks = torch.full((len(requests), self.num_words), -1, dtype=torch.int32)
        for i, request in enumerate(requests):
            if request.matcher is not None:
                self._fill(request.matcher, masks[i])
        return masks

    def _fill(self, matcher, row: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def apply(self, logits: torch.Tensor, masks: torch.Tensor) -> None:
        """In place: -inf wherever a row's mask bit is 0 (the masks, made on the CPU, move to the logits' device)."""
        masks = masks.to(logits.device, non_blocking=True)
        bits = torch.arange(32, dtype=torch.int32, device=logits.device)
        allowed = ((masks.unsqueeze(-1) >> bits) & 1).view(masks.shape[0], -1)[:, :logits.shape[-1]]
        logits.masked_fill_(allowed == 0, float("-inf"))

    def accept(self, request, tokens: list[int]) -> None:
        """Feed a step's new tokens (before they join `output_ids`) to the request's matcher; where the grammar
        is complete (or broken), `request.grammar_end` is the output length at which the request ends."""
        matcher = request.matcher
        for i, token in enumerate(tokens):
            if not matcher.consume_token(token) or matcher.is_stopped():
                request.grammar_end = len(request.output_ids) + i + 1
                return

    # ---- speculative decoding ------------------------------------------------------------------------
    def allowed_drafts(self, request, drafts: list[int]) -> list[int]:
        """The longest prefix of the drafts that the grammar accepts."""
        return drafts[:request.matcher.validate_tokens(drafts)] if request.matcher is not None else drafts

    def draft_masks(self, request, drafts: list[int]) -> torch.Tensor:
        """The masks at each draft position and the one after them (the matcher is walked forward and back)."""
        matcher, masks = request.matcher, torch.empty((len(drafts) + 1, self.num_words), dtype=torch.int32)
        consumed = 0
        for j in range(len(drafts) + 1):
            self._fill(matcher, masks[j])
            if j < len(drafts) and matcher.consume_token(drafts[j]):
                consumed += 1
        matcher.rollback(consumed)
        return masks
