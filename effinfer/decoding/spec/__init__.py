"""Speculative decoding: proposers guess the next tokens, the target model checks them all in one pass.

A `Proposer` returns draft token ids per request; the scheduler treats them as extra tokens of the
step (within the token budget), the model computes logits at every draft position, and `verify`
accepts a prefix of the drafts by rejection sampling against the target's distribution, so outputs
keep exactly the distribution (and, greedy, the tokens) of plain decoding. Proposers are looked up by
the name in the config (`speculative_method`).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

PROPOSERS = {"ngram": "effinfer.decoding.spec.ngram:NgramProposer",
             "retrieval": "effinfer.decoding.spec.retrieval:RetrievalProposer"}


class Proposer(ABC):
    name: str = ""

    @classmethod
    def from_config(cls, spec_config, tokenizer) -> "Proposer":
        """Build from `SpecConfig` (the engine's only way in)."""
        return cls(min_n=spec_config.ngram_min, max_n=spec_config.ngram_max)

    @abstractmethod
    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` draft tokens to follow `token_ids` (prompt + output so far); [] if none."""


def proposer_class(name: str) -> type[Proposer]:
    if name not in PROPOSERS:
        raise ValueError(f"unknown speculative method {name!r}; choose from {', '.join(sorted(PROPOSERS))}")
    module, _, cls_name = PROPOSERS[name].partition(":")
    return getattr(importlib.import_module(module), cls_name)


def get_proposer(name: str, **options) -> Proposer:
    return proposer_class(name)(**options)


def proposer_from_config(spec_config, tokenizer) -> Proposer:
    return proposer_class(spec_config.speculative_method).from_config(spec_config, tokenizer)
