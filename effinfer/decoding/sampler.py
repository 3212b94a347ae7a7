"""Batched sampling with per-request parameters: penalties, logit bias, banned tokens (min_tokens, bad words),
temperature, top-k, top-p, min-p, greedy.

Each request owns a `torch.Generator`; a sample is `argmax(probs / q)` with `q ~ Exp(1)` drawn from that
generator (the exponential-race form of categorical sampling). A seeded request therefore draws the
same noise whatever else is in the batch, so its tokens do not depend on the batch composition.
Logprobs are those of the model's raw distribution (before penalties and temperature), as vLLM reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from effinfer.sampling_params import SamplingParams, TokenLogprobs


@dataclass
class SamplingRow:
    """One row of the step's logits: a request's settings, its generator and its tokens so far."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: list[int]
    output_ids: list[int]
    eos_token_ids: list[int] = field(default_factory=list)
    bad_words_ids: list[list[int]] = field(default_factory=list)
    """Token sequences of the request's bad words (`SamplingParams.bad_words`)."""

    @classmethod
    def of(cls, request, output_ids: list[int] | None = None) -> "SamplingRow":
        """The row of an engine request (any object with these attributes), optionally at a later output."""
        return cls(request.params, request.generator, request.prompt_ids,
                   request.output_ids if output_ids is None else output_ids, request.eos_token_ids,
                   request.bad_words_ids)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], constrain=None) -> SamplerOutput:
        """`logits` [num_rows, vocab] fp32; `constrain(logits)`, if given, masks a copy in place (structured
        output) before sampling, while logprobs stay those of the raw distribution."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
        if constrain is not None:
            logits = logits.clone()
            constrain(logits)
        token_ids = self.sample(logits, rows)
        return SamplerOutput(token_ids.tolist(), gather_logprobs(raw_logprobs, token_ids, rows))

    def sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """One token per row: the argmax for greedy rows, else a draw from `final_probs` (the exponential race:
        argmax(probs / q), q ~ Exp(1) drawn from each row's generator, greedy rows included)."""
        logits = _penalized(logits, rows)
        greedy = logits.argmax(dim=-1)
        if all(r.params.is_greedy for r in rows):
            return greedy
        probs = _distribution(logits, rows)
        noise = torch.empty_like(probs)
        for i, row in enumerate(rows):
            noise[i].exponential_(generator=row.generator)
        is_greedy = torch.tensor([r.params.is_greedy for r in rows], device=logits.device)
        return torch.where(is_greedy, greedy, (probs / noise).argmax(dim=-1))


def final_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution each row samples from after every setting: one-hot argmax for greedy rows,
    else softmax of the penalised, temperature-scaled, top-k/top-p/min-p-masked logits. The one pipeline
    that sampling and speculative verification share."""
    return _distribution(_penalized(logits, rows), rows)


def _penalized(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    if not any(r.params.adjusts_logits for r in rows):
        return logits
    adjusted = adjust_logits(logits.clone(), rows)
    # bans that rule out every token a grammar allows would leave nothing to sample: such a row keeps the
    # grammar's choice alone (only constrained rows can be emptied so)
    for i in (i for i, r in enumerate(rows) if r.params.structured is not None):
        if bool(torch.isneginf(adjusted[i]).all()):
            adjusted[i] = logits[i]
    return adjusted


def adjust_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """In place: penalties, then each row's logit bias, then -inf for its banned tokens."""
    apply_penalties(logits, rows)
    for i, row in enumerate(rows):
        if row.params.logit_bias:
            ids = torch.tensor(list(row.params.logit_bias), device=logits.device, dtype=torch.long)
            logits[i, ids] += torch.tensor(list(row.params.logit_bias.values()), device=logits.device,
                                           dtype=logits.dtype)
        banned = banned_tokens(row)
        if banned:
            logits[i, torch.tensor(banned, device=logits.device, dtype=torch.long)] = float("-inf")
    return logits


def banned_tokens(row: SamplingRow) -> list[int]:
    """Stop and EOS tokens until `min_tokens` are out; the last token of a bad word whose other tokens were
    just generated (a one-token bad word always)."""
    banned = []
    if len(row.output_ids) < row.params.min_tokens:
        banned += row.params.stop_token_ids + row.eos_token_ids
    for word in row.bad_words_ids:
        prefix = word[:-1]
        if not prefix or row.output_ids[len(row.output_ids) - len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def _distribution(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Penalised logits -> each row's distribution: temperature, top-k/top-p/min-p, softmax; one-hot argmax for
    greedy rows."""
    greedy = [i for i, r in enumerate(rows) if r.params.is_greedy]
    if len(greedy) == len(rows):
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    temps = torch.tensor([r.params.temperature or 1.0 for r in rows], device=logits.device)
    probs = torch.softmax(apply_top_k_top_p_min_p(logits / temps[:, None], rows), dim=-1)
    if greedy:
        probs[greedy] = torch.nn.functional.one_hot(logits[greedy].argmax(dim=-1), logits.shape[-1]).to(probs.dtype)
    return probs


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition penalty over prompt + output (divide positive logits, multiply negative ones);
    presence and frequency penalties over the output only, as OpenAI defines them."""
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), device=logits.device, dtype=torch.long)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
            out = torch.tensor(row.output_ids, device=logits.device, dtype=torch.long)
            counts = torch.zeros_like(logits[i]).scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Mask (to -inf) the tokens that top-k, top-p or min-p rule out, per row."""
    device = logits.device
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else logits.shape[-1] for r in rows], device=device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device)
    min_p = torch.tensor([r.params.min_p for r in rows], device=device)
    if bool((top_k < logits.shape[-1]).any() or (top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=device)[None, :]
        sorted_probs = sorted_logits.softmax(dim=-1)
        # keep a token while the mass before it is below top_p: the smallest set reaching top_p
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove = (ranks >= top_k[:, None]) | (mass_before >= top_p[:, None])
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def gather_logprobs(raw_logprobs: torch.Tensor | None, token_ids: torch.Tensor,
                    rows: list[SamplingRow]) -> list[TokenLogprobs | None]:
    if raw_logprobs is None:
        return [None] * len(rows)
    out: list[TokenLogprobs | None] = []
    for i, row in enumerate(rows):
        n = row.params.logprobs
        if n is None:
            out.append(None)
            continue
        values, ids = raw_logprobs[i].topk(n) if n else (raw_logprobs[i][:0], token_ids[:0])
        out.append(TokenLogprobs(float(raw_logprobs[i, token_ids[i]]), list(zip(ids.tolist(), values.tolist()))))
    return out
