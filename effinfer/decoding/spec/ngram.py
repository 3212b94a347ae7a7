"""Prompt lookup / n-gram drafting (Saxena, 2023; vLLM's `ngram`): find the latest earlier occurrence of
the sequence's last n tokens (n from `max_n` down to `min_n`) and propose the tokens that followed it.
Costs no model call; pays off where the output repeats the input (summaries, edits, code, RAG)."""

from __future__ import annotations

from effinfer.decoding.spec import Proposer


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4, window: int = 4096):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n, self.window = min_n, max_n, window

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        ids = token_ids[-self.window:]       # search recent context only: bounded cost per step
        for n in range(min(self.max_n, len(ids) - 1), self.min_n - 1, -1):
            tail = ids[-n:]
            first = tail[0]
            # scan backwards for the latest earlier match (excluding the tail itself)
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start] == first and ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + num_tokens]
                    if follow:
                        return follow
        return []
