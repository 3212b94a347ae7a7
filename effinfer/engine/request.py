"""A request's state as the scheduler sees it: tokens, how many are computed, its blocks, its status."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from effinfer.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    """EOS, a stop token id or a stop string."""
    LENGTH = "length"
    """max_tokens, the model's context length or the KV cache's whole capacity."""
    ABORT = "abort"


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    eos_token_ids: list[int] = field(default_factory=list)
    priority: int = 0
    """Lower runs first; the highest value (then the latest arrival) is preempted first."""
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose K/V are in the cache (prefix-cache hits included)."""
    num_cached_tokens: int = -1
    """Prompt tokens served by the prefix cache on first scheduling (-1: not scheduled yet)."""
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    """Chained hashes of the full blocks of `all_ids`, extended as tokens arrive."""
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    generator: torch.Generator | None = None
    """This request's own sampling generator, made on the engine's device when the request is added."""
    spec_ids: list[int] = field(default_factory=list)
    """Draft tokens proposed for this step (speculative decoding); verified, then cleared."""
    num_spec_tokens: int = 0
    """Draft length for this request's next proposal, adapted to its acceptance."""
    exit_threshold: float | None = None
    """Early exit: the confidence its decode tokens need to leave the model early (None: never)."""
    bad_words_ids: list[list[int]] = field(default_factory=list)
    """`params.bad_words` as token sequences (with and without a leading space)."""
    pooled: torch.Tensor | None = None
    """Embedding requests: the sum (mean pooling) or last (last pooling) of the final hidden states so far."""
    embedding: list[float] | None = None
    """Embedding requests: the pooled, normalised vector once the whole prompt has run."""
    matcher: object | None = None
    """Structured output: the llguidance matcher of `params.structured` (`decoding.structured`)."""
    grammar_end: int | None = None
    """Structured output: the output length at which the grammar is complete; the request stops there."""
    num_reported_tokens: int = 0
    """Output tokens already handed out in a `CoreOutput`."""
    prompt_logprobs: list | None = None
    """`TokenLogprobs` per prompt position so far, when asked for (the first is None: nothing precedes it)."""
    cacheable_len: int | None = None
    """Tokens whose K/V may be shared through the prefix cache (None: all). Early exit sets the prompt
    length: K/V of later tokens may be approximate (filled from an exit layer's hidden state)."""

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`all_ids[start:end]` without concatenating the whole sequence (the per-step hot path)."""
        num_prompt = len(self.prompt_ids)
        if start >= num_prompt:
            return self.output_ids[start - num_prompt:end - num_prompt]
        return self.prompt_ids[start:end] + self.output_ids[:max(end - num_prompt, 0)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED

    def sort_key(self) -> tuple[int, float]:
        return (self.priority, self.arrival_time)
