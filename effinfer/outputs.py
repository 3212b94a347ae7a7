"""What the engine hands back for each request: token ids from the engine core every step (`CoreOutput`),
and text beside them (`RequestOutput`, made by `output_processor.OutputProcessor` on the core's client side)."""

from __future__ import annotations

from dataclasses import dataclass, field

from effinfer.sampling_params import TokenLogprobs


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    """Prompt tokens served by the prefix cache."""
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class CoreOutput:
    """What one engine step added to one request, in token ids (what crosses the core process boundary).
    Token-level stops (EOS, stop token ids, lengths) are decided here; text and stop strings are not."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs | None] | None = None
    """One per new token, when the request asked for them."""
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    """The stop token id that ended the request, or why the engine did ("kv_cache_full"), if any."""
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    num_preemptions: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """With the request's first output (its whole prompt is computed by then), when it asked for them."""
    embedding: list[float] | None = None
    """An embedding request's pooled vector, with its final output."""


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """All output tokens so far."""
    text: str
    """All output text so far (stop strings cut off; text that may begin a stop string held back)."""
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    """The text that this step adds to `text`: the streaming delta."""
    logprobs: list[TokenLogprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None
    """stop, length or abort (OpenAI's names)."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request, if any."""
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    """Per prompt token (None for the first), when the request asked for them."""
    embedding: list[float] | None = None
    """An embedding request's pooled, L2-normalised vector (`SamplingParams.pooling`), once finished."""


@dataclass
class EngineStats:
    """The engine's counters after a step: what the server's metrics and health read, in either process."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    """Fraction of KV blocks in use (0-1)."""
    num_free_blocks: int = 0
    num_blocks: int = 0
    prefix_hit_tokens: int = 0
    prefix_queried_tokens: int = 0
    num_preemptions: int = 0
    spec: dict[str, int] = field(default_factory=lambda: {"draft_tokens": 0, "accepted_tokens": 0, "verify_steps": 0})
    exit_candidates: int = 0
    exits_by_layer: dict[int, int] = field(default_factory=dict)
    decode_steps: str = "eager"
    """How decode steps run: eager, compiling (eager meanwhile), compiled, or eager (compile failed)."""


@dataclass
class GenerationResult:
    """The `n` samples of one prompt from `LLM.generate`."""

    prompt_token_ids: list[int]
    outputs: list[RequestOutput]

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
