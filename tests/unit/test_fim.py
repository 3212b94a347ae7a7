"""Fill in the middle: the vocabulary's own FIM tokens in prefix-suffix-middle order, a clear error without them."""

from __future__ import annotations

import pytest

from effinfer.loader.tokenizer import Tokenizer
from tiny_models import tiny_tokenizer


def with_tokens(names):
    backend = tiny_tokenizer()
    backend.add_special_tokens(list(names))
    return Tokenizer(backend, eos_token_ids=[0])


@pytest.mark.parametrize("names", [("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
                                   ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")])
def test_prefix_suffix_middle_order(names):
    tok = with_tokens(names)
    start, hole, end = (tok.backend.token_to_id(n) for n in names)
    assert tok.encode_fim("w1 w2", "w3") == [start, 1, 2, hole, 3, end]


def test_a_vocabulary_without_fim_tokens_is_refused():
    with pytest.raises(ValueError, match="fill-in-the-middle"):
        with_tokens(["<|im_start|>"]).encode_fim("w1", "w2")
