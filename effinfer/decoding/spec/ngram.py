"""Prompt lookup / n-gram drafting (Saxena, 2023; vLLM's `ngram`): find the latest earlier occurrence of
the sequence's last n tokens (n from `max_n` down to `min_n`) and propose the tokens that followed it.
Costs no model call; pays off where the output repeats the input (summaries, edits, code, RAG).

When nothing matches, a substitution match: the tokens before the last one are looked up instead, and the
copy resumes one source token later, past the one the model just replaced. Copies that normalise as they
go ("Township , Cape" rewritten as "Township, Cape") break an exact match at every such token; measured on
SmolLM2 (edit, chat, code prompts), tokens per step rose from 2.31 / 2.01 / 2.12 to 2.61 / 2.27 / 2.25
with it and a 1-token minimum match."""

from __future__ import annotations

from effinfer.decoding.spec import Proposer


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 4, window: int = 4096):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n, self.window = min_n, max_n, window

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        ids = token_ids[-self.window:]       # search recent context only: bounded cost per step
        return self._follow(ids, ids, num_tokens, 0) or self._follow(ids, ids[:-1], num_tokens, 1)

    def _follow(self, ids: list[int], context: list[int], num_tokens: int, skip: int) -> list[int]:
        """The tokens after the latest earlier match of `context`'s last n tokens in `ids` (n from max_n down),
        `skip` tokens further on. skip=1 is the substitution match: the sequence's last token replaced the
        source's next one (a copy that rewrites "word ," as "word,"), and the copy goes on after it."""
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            tail = context[-n:]
            first = tail[0]
            # scan backwards for the latest earlier match (excluding the tail itself)
            for start in range(len(context) - n - 1, -1, -1):
                if ids[start] == first and ids[start:start + n] == tail:
                    follow = ids[start + n + skip:start + n + skip + num_tokens]
                    if follow:
                        return follow
        return []
