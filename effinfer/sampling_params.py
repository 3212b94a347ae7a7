"""Per-request sampling settings, validated where they enter (with the bad value and the valid range), and the
log-probabilities a request that asks for them gets back (`TokenLogprobs`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
POOLING = (None, "mean", "last")


@dataclass
class TokenLogprobs:
    logprob: float
    """Log-probability of the sampled token."""
    top: list[tuple[int, float]]
    """The `logprobs` most likely (token id, log-probability) pairs, most likely first."""


@dataclass
class StructuredOutputParams:
    """Exactly one of these constrains the output (vLLM's `structured_outputs` fields)."""

    json: str | None = None
    """A JSON schema (as JSON text): the output is a JSON value that validates against it."""
    json_object: bool = False
    """The output is a JSON object (OpenAI's JSON mode)."""
    regex: str | None = None
    """The output matches this regular expression (Rust `regex` syntax)."""
    choice: list[str] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """The output is a sentence of this context-free grammar (Lark, or llama.cpp's GBNF)."""

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured output needs exactly one of json, json_object, regex, choice and grammar "
                             f"(got {', '.join(given) or 'none'})")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured output choice must be a non-empty list of non-empty strings")


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """Most tokens to generate."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 keeps all."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability sums to at least p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    repetition_penalty: float = 1.0
    """>1 discourages tokens seen in the prompt or output (CTRL-style: divides positive logits)."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated (OpenAI semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every token already generated (OpenAI semantics)."""
    seed: int | None = None
    """Seeds this request's own generator: the same seed and prompt give the same tokens in any batch."""
    stop: list[str] = field(default_factory=list)
    """Strings that end generation; they are cut from the returned text."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    """Generate at least this many tokens: EOS and `stop_token_ids` are masked out and stop strings do not
    end the request before then."""
    logit_bias: dict[int, float] | None = None
    """Added to the logits of these token ids before sampling (OpenAI's -100..100; -100 bans a token)."""
    pooling: str | None = None
    """Embed instead of generate: the prompt's final hidden states pooled ("mean" over its tokens, or the
    "last" token's), L2-normalised, in `RequestOutput.embedding`; no token is generated."""
    structured: StructuredOutputParams | None = None
    """Constrain the output to a JSON schema, JSON object, regex, choice or grammar (`decoding.grammar`)."""
    bad_words: list[str] = field(default_factory=list)
    """Words never generated: the last token of each (as the tokenizer writes it, with and without a leading
    space) is masked where the tokens before it have just been generated."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and of this many top alternatives."""
    prompt_logprobs: int | None = None
    """Also return the log-probability of every prompt token (and this many top alternatives); such a
    request computes its whole prompt (no prefix-cache hits)."""
    n: int = 1
    """Samples per prompt; they share the prompt's KV blocks."""
    skip_special_tokens: bool = True
    early_exit_threshold: float | None = None
    """Early exit (an engine with exit heads): the confidence a token needs to leave the model after an
    intermediate layer; higher is closer to the full model, 1 never exits. None: the engine's default."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an integer >= 1")
        _check(0.0 <= self.temperature <= 100.0, "temperature", self.temperature, "between 0 and 100")
        _check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k", self.top_k, "-1, 0 (all) or a positive integer")
        _check(0.0 < self.top_p <= 1.0, "top_p", self.top_p, "in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min_p", self.min_p, "in [0, 1]")
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty", self.repetition_penalty, "in (0, 10]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        _check(self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS, "logprobs", self.logprobs,
               f"between 0 and {MAX_LOGPROBS}")
        _check(self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS, "prompt_logprobs",
               self.prompt_logprobs, f"between 0 and {MAX_LOGPROBS}")
        _check(self.early_exit_threshold is None or 0.0 <= self.early_exit_threshold <= 1.0, "early_exit_threshold",
               self.early_exit_threshold, "between 0 and 1")
        _check(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an integer >= 1")
        _check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens, "min_tokens",
               self.min_tokens, f"an integer between 0 and max_tokens ({self.max_tokens})")
        _check(self.logit_bias is None or all(isinstance(t, int) and t >= 0 and -100.0 <= b <= 100.0
                                              for t, b in self.logit_bias.items()),
               "logit_bias", self.logit_bias, "token ids >= 0 mapped to biases in [-100, 100]")
        _check(all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words", self.bad_words,
               "non-empty strings")
        _check(self.pooling in POOLING, "pooling", self.pooling, f"one of {POOLING}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")

    def for_sample(self, k: int) -> "SamplingParams":
        """Sample k of n as a single-sample request; a seed is offset by k so the n samples differ."""
        return dataclasses.replace(self, n=1, seed=None if self.seed is None else self.seed + k)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether anything changes this request's logits before the distribution (penalties, bias, bans)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0 or bool(self.bad_words)


def _check(ok: bool, name: str, value, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {expected}")
