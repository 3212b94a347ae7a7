"""Retrieval drafting (REST; He et al., 2024): continuations looked up in a datastore of token sequences.

The datastore is a corpus tokenized once (e.g. the code base or documents the model will be asked
about). For each n in [min_n, max_n], every n-gram of the corpus is hashed (a polynomial rolling hash
in int64) and kept sorted with its latest position, so a lookup is one binary search; the draft is
the corpus tokens that followed the sequence's last n tokens, longest match first. Memory: 12 bytes
per corpus token per n.
"""

from __future__ import annotations

import numpy as np

from effinfer.decoding.spec import Proposer

_BASE = np.int64(1_000_003)


class RetrievalProposer(Proposer):
    name = "retrieval"
    required_options = {"speculative_corpus": "a text file to draft from"}

    def __init__(self, corpus_ids: list[int], min_n: int = 2, max_n: int = 4):
        if not corpus_ids:
            raise ValueError("retrieval drafting needs a non-empty corpus (speculative_corpus=PATH)")
        self.corpus = np.asarray(corpus_ids, dtype=np.int64)
        self.min_n, self.max_n = min_n, max_n
        self.tables = {n: self._index(n) for n in range(min_n, max_n + 1) if n < len(self.corpus)}

    @classmethod
    def from_config(cls, spec_config, context) -> "RetrievalProposer":
        from pathlib import Path

        text = Path(spec_config.speculative_corpus).read_text(encoding="utf-8")
        return cls(context.tokenizer.encode(text, add_special_tokens=False), spec_config.ngram_min, spec_config.ngram_max)

    def _index(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        hashes = _rolling_hashes(self.corpus, n)
        starts = np.arange(len(hashes))
        # latest occurrence of each n-gram: stable sort by hash, keep the last of each run
        order = np.argsort(hashes, kind="stable")
        keys, pos = hashes[order], starts[order]
        last = np.append(keys[1:] != keys[:-1], True)
        return keys[last], pos[last]

    def propose(self, token_ids: list[int], num_tokens: int) -> list[int]:
        for n in range(self.max_n, self.min_n - 1, -1):
            if n not in self.tables or len(token_ids) < n:
                continue
            keys, pos = self.tables[n]
            tail = np.asarray(token_ids[-n:], dtype=np.int64)
            key = _rolling_hashes(tail, n)[0]
            i = np.searchsorted(keys, key)
            if i < len(keys) and keys[i] == key:
                start = int(pos[i])
                if np.array_equal(self.corpus[start:start + n], tail):    # rule out a hash collision
                    follow = self.corpus[start + n:start + n + num_tokens]
                    if len(follow):
                        return follow.tolist()
        return []


def _rolling_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash of every window of n tokens (int64 arithmetic wraps, which is fine for a hash)."""
    h = np.zeros(len(ids) - n + 1, dtype=np.int64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _BASE + ids[j:len(ids) - n + 1 + j]
    return h
