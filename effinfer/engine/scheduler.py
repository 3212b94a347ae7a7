"""The token-budget scheduler: each step hands every scheduled request a number of new tokens.

There are no prefill and decode phases: a request needs `num_tokens - num_computed_tokens` more tokens
computed (its whole prompt at first, one token per step afterwards). Running requests are served first,
in priority order, then waiting ones join while the step's token budget, `max_num_seqs` and the block
pool allow. A prompt longer than what is left of the budget is cut into chunks (chunked prefill), so
the decodes of running requests keep flowing. When the pool runs dry, the running request with the
lowest priority (the latest, among equals) is preempted: its blocks are freed, and it is later
recomputed from its prompt and the tokens it already produced, which gives the same output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from effinfer.engine.block_manager import BlockManager
from effinfer.engine.request import FinishReason, Request, RequestStatus


@dataclass
class SchedulerOutput:
    num_new_tokens: dict[str, int] = field(default_factory=dict)
    """request id -> tokens to compute this step, in the order of `requests`."""
    requests: list[Request] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    finished: list[Request] = field(default_factory=list)
    """Requests ended by the scheduler itself (e.g. no room left in the whole cache)."""

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, enable_chunked_prefill: bool = True):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        self.running.sort(key=Request.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            pending = request.num_tokens - request.num_computed_tokens
            num_new = min(pending + len(request.spec_ids), budget)
            del request.spec_ids[max(0, num_new - pending):]      # drafts that do not fit the budget wait
            while self.block_manager.allocate(request, num_new) is None:
                if request.spec_ids:          # out of blocks: give up the drafts before anyone's place
                    num_new -= len(request.spec_ids)
                    request.spec_ids = []
                    continue
                if not self._preempt_lowest(request, out):
                    break
            if request.status != RequestStatus.RUNNING:
                continue  # it preempted itself or was finished; `running` shrank at index i
            self._add_to_output(out, request, num_new)
            budget -= num_new
            i += 1
        return budget

    def _preempt_lowest(self, request: Request, out: SchedulerOutput) -> bool:
        """Free the blocks of the lowest-priority running request (the tail of the sorted running list,
        never one already scheduled this step). False if `request` itself had to go."""
        if len(self.running) == 1:  # alone and still short of blocks: it can never fit
            self._finish_for_capacity(request, out)
            return False
        victim = self.running[-1]
        self._preempt(victim)
        out.preempted.append(victim)
        return victim is not request

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.spec_ids = []
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(request)

    def _finish_for_capacity(self, request: Request, out: SchedulerOutput) -> None:
        """Alone and still out of blocks: the whole cache is too small for this sequence to go on."""
        self.finish(request, FinishReason.LENGTH, stop_reason="kv_cache_full")
        out.finished.append(request)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        self.waiting.sort(key=Request.sort_key)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            # prompt logprobs and pooled embeddings need every prompt position computed: no cached prefix
            whole_prompt = request.params.prompt_logprobs is not None or request.params.pooling is not None
            cached = [] if whole_prompt else self.block_manager.find_cached_prefix(request)
            num_cached = len(cached) * self.block_manager.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget and not self.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.block_manager.allocate(request, num_new, cached) is None:
                break
            self.waiting.pop(0)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
                request.first_scheduled_time = time.monotonic()
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_to_output(out, request, num_new)
            budget -= num_new

    def _add_to_output(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        out.num_new_tokens[request.request_id] = num_new
        out.requests.append(request)
        # drafts are not known tokens yet: only verified ones fill cacheable blocks
        limit = min(request.num_computed_tokens + num_new, request.num_tokens)
        if request.cacheable_len is not None:
            limit = min(limit, request.cacheable_len)
        self.block_manager.cache_full_blocks(request, limit)

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Account for the computed tokens, append the sampled tokens (several when drafts were
        accepted), finish requests that stop. Returns the requests that got tokens this step."""
        updated = []
        for request in out.requests:
            if request.is_finished:  # aborted while the step ran
                continue
            tokens = sampled.get(request.request_id, [])
            # K/V stand for the scheduled tokens up to the last accepted draft; rejected drafts' slots
            # are simply overwritten later
            num_rejected = len(request.spec_ids) - max(0, len(tokens) - 1)
            request.num_computed_tokens += out.num_new_tokens[request.request_id] - num_rejected
            request.spec_ids = []
            if not tokens:
                continue  # a prefill chunk that has not reached the end of the prompt
            for token in tokens:
                request.output_ids.append(token)
                reason = self._stop_reason(request)
                if reason is not None:
                    self.finish(request, reason, stop_reason=request.stop_reason)
                    break
            updated.append(request)
        return updated

    def _stop_reason(self, request: Request) -> FinishReason | None:
        token, params = request.output_ids[-1], request.params
        if token in params.stop_token_ids:
            request.stop_reason = token
            return FinishReason.STOP
        if not params.ignore_eos and token in request.eos_token_ids:
            return FinishReason.STOP
        if request.grammar_end is not None and len(request.output_ids) >= request.grammar_end:
            return FinishReason.STOP
        if len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, request: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        """End a request wherever it is (running, waiting, or mid-step) and return its blocks."""
        if request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.block_manager.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
