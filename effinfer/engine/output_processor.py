"""Turns appended tokens into text deltas: incremental detokenization and stop strings.

A stop string may span token boundaries, so the text that could still turn out to begin one
(`max stop length - 1` characters) is held back until the next token decides; on a match the text is
cut where the stop string starts and the request finishes with reason `stop`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from effinfer.engine.request import Request
from effinfer.loader.tokenizer import IncrementalDetokenizer, Tokenizer
from effinfer.outputs import RequestMetrics, RequestOutput
from effinfer.sampling_params import TokenLogprobs


@dataclass
class RequestState:
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=lambda: [None])
    """Per prompt position; the first token has no logprob (nothing precedes it)."""


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, request: Request) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids, request.params.skip_special_tokens)
        self.states[request.request_id] = RequestState(detok, RequestMetrics(request.arrival_time))

    def process(self, request: Request, logprobs: list[TokenLogprobs | None] | None) -> str | None:
        """Detokenize the tokens the request got this step (those not yet emitted; several when drafts
        were accepted); returns a matched stop string, if any (the tokens after it are dropped)."""
        state = self.states[request.request_id]
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = time.monotonic()
        first = state.num_emitted_tokens
        for i, token in enumerate(request.output_ids[first:]):
            if logprobs and logprobs[i] is not None:
                state.logprobs.append(logprobs[i])
            old_len = len(state.text)
            state.text += state.detokenizer.add(token)
            stop = self._find_stop(state, request.params.stop, old_len)
            if stop is not None:
                del request.output_ids[first + i + 1:]
                return stop
        return None

    def add_prompt_logprobs(self, request: Request, start: int, logits) -> None:
        """Row j of `logits` (position start + j) scores prompt token start + j + 1. Positions already
        recorded (a preempted request recomputes its prompt) are skipped."""
        state = self.states.get(request.request_id)
        if state is None:
            return
        logprobs = logits.log_softmax(dim=-1)
        num_top = request.params.prompt_logprobs
        for j in range(logprobs.shape[0]):
            target = start + j + 1
            if target >= len(request.prompt_ids) or target < len(state.prompt_logprobs):
                continue
            token = request.prompt_ids[target]
            values, ids = logprobs[j].topk(num_top) if num_top else (logprobs[j][:0], logprobs[j][:0].long())
            state.prompt_logprobs.append(TokenLogprobs(float(logprobs[j, token]), list(zip(ids.tolist(), values.tolist()))))

    def _find_stop(self, state: RequestState, stops: list[str], old_len: int) -> str | None:
        for stop in stops:
            index = state.text.find(stop, max(0, old_len - len(stop) + 1))
            if index >= 0:
                state.text = state.text[:index]
                return stop
        return None

    def make_output(self, request: Request) -> RequestOutput:
        state = self.states[request.request_id]
        if request.is_finished:
            if request.finish_reason != "stop" or not isinstance(request.stop_reason, str):
                state.text += state.detokenizer.flush()
            visible = len(state.text)
            state.metrics.finished_time = time.monotonic()
            del self.states[request.request_id]
        else:
            holdback = max((len(s) for s in request.params.stop), default=1) - 1
            visible = max(state.num_emitted_chars, len(state.text) - holdback)
        state.metrics.num_cached_tokens = max(request.num_cached_tokens, 0)
        state.metrics.first_scheduled_time = request.first_scheduled_time
        state.metrics.num_preemptions = request.num_preemptions
        new_text = state.text[state.num_emitted_chars:visible]
        new_ids = request.output_ids[state.num_emitted_tokens:]
        state.num_emitted_chars, state.num_emitted_tokens = visible, len(request.output_ids)
        return RequestOutput(
            request.request_id, request.prompt_ids, list(request.output_ids), state.text[:visible],
            new_ids, new_text, state.logprobs if request.params.logprobs is not None else None,
            request.is_finished, request.finish_reason.value if request.finish_reason else None,
            request.stop_reason, state.metrics,
            state.prompt_logprobs if request.params.prompt_logprobs is not None else None)

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)
