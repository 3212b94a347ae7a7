"""Incremental detokenization on real tokenizers: deltas add up to the full decode and never carry a
broken UTF-8 character, for byte-level BPE (SmolLM2) and SentencePiece with byte fallback (Gemma 3)."""

from __future__ import annotations

import pytest

from effinfer.loader import catalog
from effinfer.loader.gguf import GGUFFile
from effinfer.loader.tokenizer import IncrementalDetokenizer, load_gguf_tokenizer

TEXTS = [
    " Emoji 🤖🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵 end",
    " 日本語のテキストと한국어 텍스트",
    "  spaces   and\ttabs\n\nnew lines",
    " Straße café naïve Ελληνικά",
    "def f(x):\n    return x ** 2  # ≥ 0",
]


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def tokenizer(request):
    path = catalog.pull(request.param, show_progress=False)
    eos = GGUFFile(path).arch_config().eos_token_ids
    return load_gguf_tokenizer(path, eos, catalog.cache_dir() / "tokenizers")


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_and_never_break_a_character(tokenizer, text):
    prompt = tokenizer.encode("Say:")
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(prompt + ids)[len(tokenizer.decode(prompt)):]


def test_multibyte_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer.encode("🤖", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("x"))
    deltas = [detok.add(t) for t in ids]
    if len(ids) > 1:          # split into byte tokens: nothing shown until the last one
        assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1].endswith("🤖")


def test_special_tokens_skipped_by_default(tokenizer):
    eos = tokenizer.eos_token_ids[0]
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(eos) == "" and detok.flush() == ""
