"""Tool calling with the official SDK against a live server on Qwen2.5-Coder (Hermes-style calls): the model
calls a tool by itself (auto), streamed as deltas, is forced to (required, a named function), gets the result
back as a `tool` message and answers; a model whose template writes no calls says so."""

from __future__ import annotations

import json

import openai
import pytest

from helpers import API_KEY, LiveServer, free_port, make_engine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
GREEDY = dict(model="qwen", temperature=0.0, max_tokens=60)


@pytest.fixture(scope="module")
def qwen_client():
    import torch

    from effinfer.loader import catalog
    from effinfer.models import load_model
    from effinfer.serving.api_server import ServerConfig

    path = catalog.pull("qwen2.5-coder-0.5b-instruct", show_progress=False)
    engine = make_engine(load_model(str(path), torch.bfloat16, show_progress=False), dtype="bfloat16",
                         num_blocks=128, max_num_seqs=8, max_model_len=2048)
    config = ServerConfig(port=free_port(), api_keys=[API_KEY], served_model_name="qwen")
    with LiveServer(engine, config) as server:
        yield openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_auto_the_model_calls_the_tool(qwen_client):
    response = qwen_client.chat.completions.create(messages=ASK, tools=[WEATHER, TIME], **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert "paris" in json.loads(call.function.arguments)["city"].lower()


def test_auto_streamed_deltas_add_up_to_the_same_call(qwen_client):
    whole = qwen_client.chat.completions.create(messages=ASK, tools=[WEATHER, TIME], **GREEDY).choices[0].message
    calls, finish, content = {}, None, ""
    for chunk in qwen_client.chat.completions.create(messages=ASK, tools=[WEATHER, TIME], stream=True, **GREEDY):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and "<tool_call>" not in content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls]


def test_required_and_named_choices_force_valid_calls(qwen_client):
    ask = [{"role": "user", "content": "Tell me a joke about cats."}]   # a question no tool answers
    required = qwen_client.chat.completions.create(messages=ask, tools=[WEATHER, TIME], tool_choice="required",
                                                   **GREEDY).choices[0]
    assert required.finish_reason == "tool_calls" and required.message.tool_calls
    for call in required.message.tool_calls:
        assert call.function.name in ("get_weather", "get_time")
        assert isinstance(json.loads(call.function.arguments), dict)
    named = qwen_client.chat.completions.create(
        messages=ask, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
        **GREEDY).choices[0]
    assert [c.function.name for c in named.message.tool_calls] == ["get_time"]
    assert "zone" in json.loads(named.message.tool_calls[0].function.arguments)


def test_the_tool_result_goes_back_and_the_model_answers(qwen_client):
    first = qwen_client.chat.completions.create(messages=ASK, tools=[WEATHER], **GREEDY).choices[0].message
    call = first.tool_calls[0]
    messages = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                          "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 18, "sky": "sunny"}'}]
    answer = qwen_client.chat.completions.create(messages=messages, tools=[WEATHER], **GREEDY).choices[0]
    assert answer.finish_reason == "stop" and not answer.message.tool_calls
    assert "18" in answer.message.content


def test_none_and_bad_choices(qwen_client):
    plain = qwen_client.chat.completions.create(messages=ASK, tools=[WEATHER], tool_choice="none", **GREEDY)
    assert not plain.choices[0].message.tool_calls and plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        qwen_client.chat.completions.create(messages=ASK, tools=[WEATHER], **GREEDY,
                                            tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="one output constraint"):
        qwen_client.chat.completions.create(messages=ASK, tools=[WEATHER], tool_choice="required",
                                            response_format={"type": "json_object"}, **GREEDY)


def test_a_template_without_tool_calls_says_so(client):
    with pytest.raises(openai.BadRequestError, match="writes no tool calls"):
        client.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=4)


def test_fill_in_the_middle_uses_the_models_fim_tokens(qwen_client):
    """`suffix` on completions: Qwen2.5-Coder's <|fim_prefix|> ... <|fim_suffix|> ... <|fim_middle|> prompt."""
    from effinfer.loader import catalog
    from effinfer.loader.gguf import GGUFFile
    from effinfer.loader.tokenizer import load_gguf_tokenizer

    prefix, suffix = "def add(a, b):\n    ", "\n\nprint(add(2, 3))\n"
    path = catalog.pull("qwen2.5-coder-0.5b-instruct", show_progress=False)
    tokenizer = load_gguf_tokenizer(path, GGUFFile(path).arch_config().eos_token_ids, catalog.cache_dir() / "tokenizers")
    completion = qwen_client.completions.create(model="qwen", prompt=prefix, suffix=suffix, max_tokens=16,
                                                temperature=0.0)
    # the three FIM tokens around the prefix and the suffix, nothing else
    expected = 3 + len(tokenizer.encode(prefix, False)) + len(tokenizer.encode(suffix, False))
    assert completion.usage.prompt_tokens == expected
    assert "return" in completion.choices[0].text and "a + b" in completion.choices[0].text
