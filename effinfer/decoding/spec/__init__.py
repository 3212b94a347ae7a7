"""Speculative decoding: proposers guess the next tokens, the target model checks them all in one pass.

A `Proposer` returns draft token ids per request; the scheduler treats them as extra tokens of the
step (within the token budget), the model computes logits at every draft position, and `verify`
accepts a prefix of the drafts by rejection sampling against the target's distribution, so outputs
keep exactly the distribution (and, greedy, the tokens) of plain decoding. Proposers are looked up by
the name in the config (`speculative_method`).
"""

from __future__ import annotations

import importlib
from abc import ABC
from dataclasses import dataclass

PROPOSERS = {"ngram": "effinfer.decoding.spec.ngram:NgramProposer",
             "retrieval": "effinfer.decoding.spec.retrieval:RetrievalProposer",
             "draft_model": "effinfer.decoding.spec.draft_model:DraftModelProposer",
             "self": "effinfer.decoding.spec.draft_model:SelfDraftProposer",
             "lookahead": "effinfer.decoding.spec.lookahead:LookaheadProposer"}


@dataclass
class DraftRequest:
    request_id: str
    token_ids: list[int]
    """Prompt + output so far."""
    num_tokens: int
    """Most draft tokens wanted."""


class Proposer(ABC):
    name: str = ""

    @classmethod
    def from_config(cls, spec_config, engine) -> "Proposer":
        """Build from `SpecConfig` and the engine it drafts for (its tokenizer, model, and a way to give a
        draft model its own KV cache): the engine's only way in."""
        return cls(min_n=spec_config.ngram_min, max_n=spec_config.ngram_max)

    def propose_batch(self, batch: list[DraftRequest]) -> list[list[int]]:
        """Draft tokens for each request of a step; model-based proposers run them all in one pass."""
        return [self.propose(r.token_ids, r.num_tokens) if r.num_tokens > 0 else [] for r in batch]

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` draft tokens to follow `token_ids` (prompt + output so far); [] if none."""
        raise NotImplementedError

    def observe(self, request_id: str, start: int, drafts: list[int], logits) -> None:
        """After verification: the drafts sat at positions `start`, ...; `logits` [len(drafts) + 1, vocab] are
        the target's rows at the token before them and at each draft (what lookahead iterates on)."""

    def release(self, request_id: str) -> None:
        """The request is gone: drop any state kept for it (a draft model's KV blocks)."""


def proposer_class(name: str) -> type[Proposer]:
    if name not in PROPOSERS:
        raise ValueError(f"unknown speculative method {name!r}; choose from {', '.join(sorted(PROPOSERS))}")
    module, _, cls_name = PROPOSERS[name].partition(":")
    return getattr(importlib.import_module(module), cls_name)


def get_proposer(name: str, **options) -> Proposer:
    return proposer_class(name)(**options)


def proposer_from_config(spec_config, engine) -> Proposer:
    return proposer_class(spec_config.speculative_method).from_config(spec_config, engine)
