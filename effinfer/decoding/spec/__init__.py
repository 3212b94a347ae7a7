"""Speculative decoding: proposers guess the next tokens, the target model checks them all in one pass.

A `Proposer` returns draft token ids per request; the scheduler treats them as extra tokens of the
step (within the token budget), the model computes logits at every draft position, and `verify`
accepts a prefix of the drafts by rejection sampling against the target's distribution, so outputs
keep exactly the distribution (and, greedy, the tokens) of plain decoding. Proposers are looked up by
the name in the config (`speculative_method`); the facade builds one (`speculator_from_config`) and hands
the engine a `Speculator` (speculator.py), which the engine calls before scheduling and after the forward.
"""

from __future__ import annotations

import importlib
from abc import ABC
from collections.abc import Callable
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


@dataclass
class DraftContext:
    """What a proposer may use of the engine it drafts for; the facade builds it (effinfer/llm.py)."""

    model: object
    """The target model."""
    tokenizer: object
    vocab_size: int
    """The target's vocabulary size."""
    cache_dir: str | None
    load_model: Callable[[str, str | None], object]
    """(name, quantization or None) -> a `LoadedModel` on the target's device and dtype (a draft model)."""
    side_model: Callable[..., object]
    """(model, memory_gb, max_len=None) -> a `SideModel`: that model with its own KV pool, keyed by request id."""


class Proposer(ABC):
    name: str = ""
    required_options: dict[str, str] = {}
    """`SpecConfig` fields this proposer cannot run without -> what to give (checked before any model loads)."""

    @classmethod
    def from_config(cls, spec_config, context: DraftContext) -> "Proposer":
        """Build from `SpecConfig` and what it may use of the engine it drafts for (`DraftContext`)."""
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


def speculator_from_config(spec_config, context: DraftContext):
    """The `Speculator` (proposer, draft length, batch limit) that `SpecConfig` asks for."""
    from effinfer.decoding.spec.speculator import Speculator

    proposer = proposer_class(spec_config.speculative_method).from_config(spec_config, context)
    return Speculator(proposer, spec_config.num_speculative_tokens, spec_config.speculative_max_batch)
