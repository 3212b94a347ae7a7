"""What a request's output must match, as llguidance grammars: a JSON schema, any JSON object, a regular
expression, one of a list of strings, or a Lark / GBNF grammar. Torch-free: the API process checks a request's
grammar here (a 400 naming the problem) before the engine core compiles it for its tokenizer
(`decoding.structured`)."""

from __future__ import annotations

import json
from functools import lru_cache

from effinfer.sampling_params import StructuredOutputParams


def grammar_text(params: StructuredOutputParams) -> str:
    """The llguidance grammar of a constraint (not yet checked: `check_grammar`)."""
    return _grammar_text(params.json, params.json_object, params.regex, tuple(params.choice or ()) or None,
                         params.grammar)


@lru_cache(maxsize=256)
def _grammar_text(schema, json_object, regex, choice, grammar) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    if schema is not None:
        try:
            return LLMatcher.grammar_from_json_schema(schema)
        except ValueError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
    if json_object:
        return LLMatcher.grammar_from_json_schema({"type": "object"})
    if regex is not None:
        return LLMatcher.grammar_from_regex(regex)
    if choice is not None:
        return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choice))
    try:
        return LLMatcher.grammar_from_lark(any_to_lark(grammar))
    except Exception as exc:  # the GBNF converter raises its own kinds
        raise ValueError(f"the grammar could not be read: {exc}") from None


@lru_cache(maxsize=256)
def _check(text: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.validate_grammar(text)


def check_grammar(params: StructuredOutputParams) -> None:
    """ValueError naming the problem if the schema, regex or grammar cannot be compiled."""
    error = _check(grammar_text(params))
    if error and not error.startswith("WARNING"):
        raise ValueError(f"the structured output constraint cannot be compiled: {error}")
