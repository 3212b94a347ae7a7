"""Structured output over HTTP with the official SDK: `chat.completions.parse` with a pydantic model, JSON mode
streamed, n > 1, vLLM's `structured_outputs` and `guided_*` forms on completions; a constraint that cannot
compile is a 400 naming the problem, streaming or not, before any work starts."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import pydantic
import pytest

from helpers import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ASK = [{"role": "user", "content": "Invent a city and describe it as JSON."}]


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)
    population: int
    coastal: bool
    climate: Literal["cold", "mild", "hot"]


def test_sdk_parse_returns_a_valid_pydantic_object(client):
    completion = client.chat.completions.parse(model="smol", messages=ASK, response_format=City, max_tokens=120,
                                               temperature=0.8, seed=3, n=2)
    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, City)
        City.model_validate_json(choice.message.content)


def test_json_mode_streamed_parses(client):
    messages = [{"role": "user", "content": "Reply with a JSON object with the keys name and country for one city."}]
    stream = client.chat.completions.create(model="smol", messages=messages, response_format={"type": "json_object"},
                                            max_tokens=150, temperature=0.0, stream=True)
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and isinstance(json.loads(text), dict)


@pytest.mark.parametrize("extra, check", [
    ({"structured_outputs": {"regex": r"[A-Z][a-z]+ [0-9]{2}"}}, lambda t: re.fullmatch(r"[A-Z][a-z]+ [0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["red", "green"]}}, lambda t: t in ("red", "green")),
    ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
    ({"guided_json": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}},
     lambda t: 2 <= len(json.loads(t)) <= 4),
    ({"structured_outputs": {"grammar": 'root ::= ("ab" | "cd") ("ab" | "cd")? "!"'}},
     lambda t: re.fullmatch(r"(ab|cd){1,2}!", t)),
])
def test_vllm_forms_on_completions(client, extra, check):
    completion = client.completions.create(model="smol", prompt="Answer:", max_tokens=40, temperature=1.0, seed=1,
                                           extra_body=extra)
    assert check(completion.choices[0].text), completion.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format", "strin"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed group"),
    ({"guided_grammar": "root ::= (("}, "guided_grammar", "grammar"),
])
def test_a_constraint_that_cannot_compile_is_400(live, body, param, words, stream):
    response = httpx.post(live.base_url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          json={"model": "smol", "messages": ASK, "max_tokens": 8, "stream": stream, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def test_two_constraints_at_once_are_400(live):
    response = httpx.post(live.base_url + "/v1/chat/completions", headers=AUTH, timeout=30,
                          json={"model": "smol", "messages": ASK, "response_format": {"type": "json_object"},
                                "guided_regex": "a+"})
    assert response.status_code == 400 and "one output constraint" in response.json()["error"]["message"]
