"""Turns the engine core's token ids into text: incremental detokenization, stop strings, streaming deltas.

It runs where the text is wanted (vLLM v1's split): in the server's API process and `LLM`'s process for a
core in its own process, beside the engine for an in-process one. So the core steps the model and never
detokenizes. A stop string may span token boundaries, so the text that could still turn out to begin one
(`max stop length - 1` characters) is held back until the next token decides; on a match the text is cut
where the stop string starts, the request ends here with reason `stop`, and the caller aborts it in the
core (`process` returns its id): a core in another process may have run a step or two past it meanwhile,
whose tokens are dropped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from effinfer.loader.tokenizer import IncrementalDetokenizer, Tokenizer
from effinfer.outputs import CoreOutput, RequestMetrics, RequestOutput
from effinfer.sampling_params import SamplingParams, TokenLogprobs


@dataclass
class RequestState:
    prompt_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)
        self.states[request_id] = RequestState(prompt_ids, params, detok, RequestMetrics(time.monotonic()))

    def abort(self, request_id: str) -> bool:
        """Forget a request; whether it was still here (unfinished)."""
        return self.states.pop(request_id, None) is not None

    def clear(self) -> None:
        """Forget every request (the core that held them has died or aborted them all)."""
        self.states.clear()

    def has_unfinished(self) -> bool:
        return bool(self.states)

    def process(self, core_outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """The outputs of one core step, with text; and the ids of requests that a stop string ended here while
        the core holds them unfinished (the caller aborts them there). Outputs of requests no longer here
        (aborted, or ended by a stop string, while the step ran) are dropped."""
        outputs, stopped = [], []
        for core in core_outputs:
            state = self.states.get(core.request_id)
            if state is None:
                continue
            stop = self._add_tokens(state, core)
            if stop is not None and not core.finished:
                stopped.append(core.request_id)
            outputs.append(self._make_output(core, state, stop))
        return outputs, stopped

    def _add_tokens(self, state: RequestState, core: CoreOutput) -> str | None:
        """Detokenize the step's tokens (several when drafts were accepted); returns a matched stop string, if
        any (the tokens after the one that completed it are dropped)."""
        if core.new_token_ids and state.metrics.first_token_time is None:
            state.metrics.first_token_time = time.monotonic()
        if core.prompt_logprobs is not None:
            state.prompt_logprobs = core.prompt_logprobs
        last_is_stop_token = self._ends_on_stop_token(core, state.params)
        for i, token in enumerate(core.new_token_ids):
            state.token_ids.append(token)
            if core.new_logprobs and core.new_logprobs[i] is not None:
                state.logprobs.append(core.new_logprobs[i])
            if last_is_stop_token and i == len(core.new_token_ids) - 1:
                break   # the EOS or stop token that ended the request is not part of the text (as in vLLM)
            old_len = len(state.text)
            state.text += state.detokenizer.add(token)
            stop = self._find_stop(state, old_len) if len(state.token_ids) >= state.params.min_tokens else None
            if stop is not None:
                return stop
        return None

    def _ends_on_stop_token(self, core: CoreOutput, params: SamplingParams) -> bool:
        if not (core.finished and core.finish_reason == "stop" and core.new_token_ids):
            return False
        last = core.new_token_ids[-1]
        return last == core.stop_reason or (not params.ignore_eos and last in self.tokenizer.eos_token_ids)

    @staticmethod
    def _find_stop(state: RequestState, old_len: int) -> str | None:
        for stop in state.params.stop:
            index = state.text.find(stop, max(0, old_len - len(stop) + 1))
            if index >= 0:
                state.text = state.text[:index]
                return stop
        return None

    def _make_output(self, core: CoreOutput, state: RequestState, stop: str | None) -> RequestOutput:
        metrics = state.metrics
        metrics.num_cached_tokens, metrics.num_preemptions = core.num_cached_tokens, core.num_preemptions
        metrics.first_scheduled_time = core.first_scheduled_time
        finished = core.finished or stop is not None
        if finished:
            if stop is None:
                state.text += state.detokenizer.flush()
            visible = len(state.text)
            metrics.finished_time = time.monotonic()
            del self.states[core.request_id]
        else:
            holdback = max((len(s) for s in state.params.stop), default=1) - 1
            visible = max(state.num_emitted_chars, len(state.text) - holdback)
        new_text = state.text[state.num_emitted_chars:visible]
        new_ids = state.token_ids[state.num_emitted_tokens:]
        state.num_emitted_chars, state.num_emitted_tokens = visible, len(state.token_ids)
        finish_reason, stop_reason = ("stop", stop) if stop is not None else (core.finish_reason, core.stop_reason)
        return RequestOutput(
            core.request_id, state.prompt_ids, list(state.token_ids), state.text[:visible], new_ids, new_text,
            list(state.logprobs) if state.params.logprobs is not None else None, finished,
            finish_reason if finished else None, stop_reason if finished else None, metrics,
            state.prompt_logprobs if state.params.prompt_logprobs is not None else None, core.embedding)
