"""Prompts as users give them (text, chat messages or token ids) turned into checked token ids. Imports no
torch: the server's API process encodes prompts; the engine checks them again where it adds requests."""

from __future__ import annotations

Prompt = str | list[int] | list[dict]


def check_prompt_length(prompt_ids: list[int], max_model_len: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty (it encodes to no tokens)")
    if len(prompt_ids) >= max_model_len:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, but the context holds {max_model_len} "
                         "including at least one generated token; shorten the prompt")


def encode_prompt(tokenizer, vocab_size: int, prompt: Prompt) -> list[int]:
    """A string, chat messages or token ids -> token ids (ids checked against the vocabulary)."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return tokenizer.encode_chat(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        return list(prompt)
    raise TypeError("a prompt is a non-empty string, list of token ids, or list of chat messages")


def bad_words_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word as the tokenizer writes it alone and after a space (mid-sentence), without duplicates."""
    sequences: list[list[int]] = []
    for word in words:
        for text in (word, " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def check_token_params(params, vocab_size: int) -> None:
    """Token ids that sampling parameters name must be in the vocabulary."""
    for name, ids in (("logit_bias", list(params.logit_bias or {})), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{name} names token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
