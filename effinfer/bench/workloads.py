"""Benchmark request sets: random (seeded lengths and tokens), shared-prefix, long-context.

Prompts are text built by decoding random token ids with the model's tokenizer (as vLLM's random
dataset does), so any OpenAI endpoint can take them; token counts come back from the server's usage.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def random_requests(tokenizer, num: int, input_len: int, output_len: int, seed: int = 0,
                    range_ratio: float = 0.0, prefix_len: int = 0, as_text: bool = True) -> list[BenchRequest]:
    """`num` requests with input/output lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)];
    with `prefix_len`, all of them start with the same random prefix (a prefix-caching workload).
    Prompts are text for HTTP endpoints, or the token ids themselves (`as_text=False`) in-process."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio={range_ratio} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    vocab = _plain_token_ids(tokenizer)
    prefix = rng.choice(vocab, size=prefix_len).tolist() if prefix_len else []
    requests = []
    for _ in range(num):
        n_in = _jitter(rng, input_len, range_ratio)
        n_out = _jitter(rng, output_len, range_ratio)
        ids = prefix + rng.choice(vocab, size=n_in).tolist()
        requests.append(BenchRequest(tokenizer.decode(ids) if as_text else ids, len(ids), n_out))
    return requests


def _jitter(rng, length: int, ratio: float) -> int:
    low, high = max(1, int(length * (1 - ratio))), max(1, int(length * (1 + ratio)))
    return int(rng.integers(low, high + 1))


def _plain_token_ids(tokenizer) -> np.ndarray:
    """Ids of ordinary tokens (no special or added tokens), which decode to text that re-encodes cleanly."""
    special = tokenizer.special_ids | set(tokenizer.backend.get_added_tokens_decoder())
    return np.array([i for i in range(tokenizer.backend.get_vocab_size(with_added_tokens=False)) if i not in special])


WORKLOADS = {
    "random": dict(),
    "shared-prefix": dict(prefix_len=1000),
    "long-context": dict(input_len=4000),
}
