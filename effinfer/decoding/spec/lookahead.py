"""Lookahead (Jacobi) decoding (Santilli et al., 2023; Fu et al., 2024) on the engine's verification pass.

A request's drafts double as Jacobi guesses for the positions after its last token. The verification
forward computes the target's prediction at every draft position anyway; those predictions are the
next Jacobi iterate, so the next step's drafts are the predictions past the accepted ones (a fixed
point of the iteration is exactly the greedy continuation). Each prediction was conditioned on the
guess one position before it, and that guess on the one before it in the previous iterate: those
diagonals through the last `n - 1` iterates are n-grams the model itself generated. They go into a
per-request pool keyed by their first token; a draft is the freshest pooled n-gram that starts with
the last token (extended by chaining), else the Jacobi guess, else a seed guess from the context.
Verification keeps the output exact.

One chain per request per step: the original's separate lookahead branch, which runs a 2-D window of
guesses beside the verified candidates under a custom attention mask, is not built; here the guess
chain and the verified candidate are the same tokens.
"""

from __future__ import annotations

from collections import deque

import torch

from effinfer.decoding.spec import DraftRequest, Proposer
from effinfer.decoding.spec.ngram import NgramProposer


class _State:
    def __init__(self, n: int):
        self.guess: list[int] = []
        """Jacobi guesses for the positions after the last token."""
        self.levels: deque[dict[int, int]] = deque(maxlen=n - 1)
        """The last iterates fed to the model: absolute position -> guessed token."""
        self.pool: dict[int, deque[tuple[int, ...]]] = {}
        """First token -> the n-grams that followed it, freshest first."""


class LookaheadProposer(Proposer):
    name = "lookahead"

    def __init__(self, n: int = 4, pool_per_key: int = 4):
        if n < 2:
            raise ValueError(f"lookahead n-gram size must be at least 2, got {n}")
        self.n, self.pool_per_key = n, pool_per_key
        self.states: dict[str, _State] = {}

    @classmethod
    def from_config(cls, spec_config, context) -> "LookaheadProposer":
        return cls(n=spec_config.ngram_max)

    def propose_batch(self, batch: list[DraftRequest]) -> list[list[int]]:
        return [self._propose(r) if r.num_tokens > 0 else [] for r in batch]

    def _propose(self, request: DraftRequest) -> list[int]:
        state = self.states.setdefault(request.request_id, _State(self.n))
        draft, last = [], request.token_ids[-1]
        while len(draft) < request.num_tokens and last in state.pool:     # chain pooled n-grams
            gram = state.pool[last][0]
            draft.extend(gram[1:])
            last = gram[-1]
        draft = draft or state.guess or _seed_guess(request.token_ids, request.num_tokens)
        return draft[:request.num_tokens]

    def observe(self, request_id: str, start: int, drafts: list[int], logits: torch.Tensor) -> None:
        state = self.states.get(request_id)
        if state is None or not drafts:
            return
        preds = logits.argmax(-1).tolist()            # preds[j]: the target's token for position start + j
        state.levels.append({start + j: t for j, t in enumerate(drafts)})
        for j in range(1, len(preds)):
            gram = self._diagonal(state, start + j, preds[j])
            if gram:
                self._add(state, gram)
        accepted = next((j for j, (d, p) in enumerate(zip(drafts, preds)) if d != p), len(drafts))
        state.guess = preds[accepted + 1:]            # Jacobi: the next iterate past the emitted tokens

    def _diagonal(self, state: _State, position: int, predicted: int) -> tuple[int, ...] | None:
        """The predicted token with, before it, the guess it was conditioned on in the newest iterate, the
        one that guess was conditioned on in the iterate before, and so on."""
        gram = [predicted]
        for level, back in zip(reversed(state.levels), range(1, self.n)):
            token = level.get(position - back)
            if token is None:
                break
            gram.append(token)
        return tuple(reversed(gram)) if len(gram) >= 2 else None

    def _add(self, state: _State, gram: tuple[int, ...]) -> None:
        grams = state.pool.setdefault(gram[0], deque(maxlen=self.pool_per_key))
        if gram in grams:
            grams.remove(gram)
        grams.appendleft(gram)

    def release(self, request_id: str) -> None:
        self.states.pop(request_id, None)


def _seed_guess(token_ids: list[int], num_tokens: int) -> list[int]:
    """A first Jacobi iterate when nothing better is known: what followed the previous occurrence of the
    last token in the recent context (lookahead seeds its window from the prompt), else its last tokens."""
    return _LAST_TOKEN_LOOKUP.propose(token_ids, num_tokens) or token_ids[-num_tokens:]


_LAST_TOKEN_LOOKUP = NgramProposer(min_n=1, max_n=1, window=1024)
