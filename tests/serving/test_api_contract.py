"""The OpenAI contract beyond the basics, against the live server: unknown and unsupported fields are refused by
name, the sampling extras (logit_bias, min_tokens, bad_words, stop_token_ids) change the output as they say,
priority and request_id reach the engine, chat messages are checked, and the holes stay closed (auth before
the body, chunked bodies over the limit, the in-flight limit held against a burst of streams)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from helpers import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "smol", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
        "temperature": 0.0}
PROMPT = {"model": "smol", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0.0}


def post(live, path, body, headers=AUTH):
    return httpx.post(live.base_url + path, json=body, headers=headers, timeout=60)


def error_of(response, status):
    assert response.status_code == status, response.text
    return response.json()["error"]


def completion_ids(live, **extra):
    body = {**PROMPT, "logprobs": 0, **extra}
    response = post(live, "/v1/completions", body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    tokens = choice["logprobs"]["tokens"]
    return tokens, choice


# ---- fields -------------------------------------------------------------------------------------------
def test_unknown_fields_are_named_in_a_400(live):
    error = error_of(post(live, "/v1/chat/completions", {**CHAT, "temprature": 0.5, "zzz": 1}), 400)
    assert error["code"] == "unknown_parameter" and "temprature" in error["message"] and "zzz" in error["message"]
    error = error_of(post(live, "/v1/completions", {**PROMPT, "max_token": 3}), 400)
    assert error["param"] == "max_token"
    messages = [{"role": "user", "content": "hi", "colour": "red"}]
    assert error_of(post(live, "/v1/chat/completions", {**CHAT, "messages": messages}), 400)["param"] == \
        "messages.0.colour"


def test_lenient_mode_ignores_unknown_fields(live, monkeypatch):
    monkeypatch.setattr(live.app.state.server.config, "strict_fields", False)
    assert post(live, "/v1/chat/completions", {**CHAT, "temprature": 0.5}).status_code == 200


def test_vllm_extras_and_ignored_openai_fields_are_accepted(live):
    body = {**CHAT, "top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
            "skip_special_tokens": True, "user": "u1", "store": False, "metadata": {"a": "b"},
            "parallel_tool_calls": True, "response_format": {"type": "text"}, "best_of": 1, "seed": 3}
    response = post(live, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 8          # ignore_eos took effect


@pytest.mark.parametrize("path, field, value", [
    ("/v1/completions", "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("/v1/completions", "tool_choice", "required"),
    ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
    ("/v1/chat/completions", "best_of", 3),
])
def test_unsupported_openai_fields_are_refused_by_name(live, path, field, value):
    body = {**(PROMPT if path == "/v1/completions" else CHAT), field: value}
    error = error_of(post(live, path, body), 400)
    assert error["param"] == field and error["code"] == "unsupported_parameter"
    assert "not supported" in error["message"]


@pytest.mark.parametrize("path, body, param_or_code", [
    ("/v1/completions", {**PROMPT, "prompt": ["a"] * 13, "n": 8}, "too_many_sequences"),   # 104 > 96 ever
    ("/v1/chat/completions", {**CHAT, "priority": 2**70}, "priority"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "auto"}, "tool_choice"),
])
def test_requests_that_could_never_run_are_400(live, path, body, param_or_code):
    error = error_of(post(live, path, body), 400)
    assert param_or_code in (error["param"], error["code"])


def test_models_reports_the_context_length(live):
    model = httpx.get(live.base_url + "/v1/models", headers=AUTH).json()["data"][0]
    assert model["max_model_len"] == 1024


# ---- sampling extras --------------------------------------------------------------------------------
def test_logit_bias_bans_and_forces_tokens(live):
    tokens, _ = completion_ids(live)
    first = live.engine.tokenizer.encode(tokens[0], add_special_tokens=False)
    assert len(first) == 1
    banned, _ = completion_ids(live, logit_bias={str(first[0]): -100})
    assert banned[0] != tokens[0]
    forced_id = live.engine.tokenizer.encode(" blue", add_special_tokens=False)[0]
    forced, _ = completion_ids(live, logit_bias={str(forced_id): 100}, max_tokens=3)
    assert forced == [live.engine.tokenizer.decode([forced_id])] * 3
    assert error_of(post(live, "/v1/completions", {**PROMPT, "logit_bias": {"10000000": 1}}), 400)["param"] == \
        "logit_bias"
    assert error_of(post(live, "/v1/completions", {**PROMPT, "logit_bias": {"x": 1}}), 400)["param"] == "logit_bias"


def test_min_tokens_holds_back_stop_token_ids(live):
    tokens, _ = completion_ids(live)
    first = live.engine.tokenizer.encode(tokens[0], add_special_tokens=False)[0]
    stopped, choice = completion_ids(live, stop_token_ids=[first])
    assert choice["finish_reason"] == "stop" and stopped == tokens[:1] and choice["text"] == ""  # as vLLM
    held, choice = completion_ids(live, stop_token_ids=[first], min_tokens=3)
    assert len(held) >= 3 and tokens[0] not in held[:3]


def test_bad_words_never_appear(live):
    tokens, choice = completion_ids(live, max_tokens=12)
    word = next(t for t in tokens if t.strip().isalpha())
    _, avoided = completion_ids(live, max_tokens=12, bad_words=[word.strip()])
    assert avoided["text"] != choice["text"]
    ids = live.engine.tokenizer.encode(avoided["text"], add_special_tokens=False)
    for variant in (word.strip(), " " + word.strip()):
        banned = live.engine.tokenizer.encode(variant, add_special_tokens=False)
        assert not any(ids[i:i + len(banned)] == banned for i in range(len(ids))), variant


def test_suffix_without_fim_tokens_is_a_clear_400(live):
    error = error_of(post(live, "/v1/completions", {**PROMPT, "suffix": "and so on."}), 400)
    assert error["param"] == "suffix" and "fill-in-the-middle" in error["message"]


def test_priority_and_request_id_reach_the_engine(live, monkeypatch):
    seen = []
    add = live.engine.add_request

    def recording_add(prompt, params=None, request_id=None, priority=0):
        seen.append(priority)
        return add(prompt, params, request_id, priority)

    monkeypatch.setattr(live.engine, "add_request", recording_add)
    bodies = [{**CHAT, "priority": -3, "request_id": "mine-1"}, {**CHAT, "priority": 2, "request_id": "mine-1"}]

    async def both():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(live.base_url + "/v1/chat/completions", json=b, headers=AUTH)
                                          for b in bodies))

    responses = asyncio.run(both())
    assert [r.status_code for r in responses] == [200, 200]
    assert [r.json()["id"] for r in responses] == ["mine-1", "mine-1"]     # the same id twice is fine
    assert sorted(seen) == [-3, 2]


def test_sdk_passes_extras_through_extra_body(client):
    response = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0,
        logit_bias={"28": -100}, extra_body={"min_tokens": 4, "priority": 1, "request_id": "sdk-1"})
    assert response.id == "sdk-1" and response.usage.completion_tokens == 4


# ---- messages ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages, words", [
    ([{"role": ""}], "role"),
    ([{"role": "robot", "content": "hi"}], "role"),
    ([{"role": "user"}], "needs content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], "image_url"),
    ([{"role": "user", "content": [{"type": "text"}]}], "text"),
])
def test_bad_messages_are_400(live, messages, words):
    error = error_of(post(live, "/v1/chat/completions", {**CHAT, "messages": messages}), 400)
    assert words in error["message"]


def test_text_parts_and_tool_messages_are_accepted(live):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "4"}]
    assert post(live, "/v1/chat/completions", {**CHAT, "messages": messages}).status_code == 200


@pytest.mark.parametrize("prompt", ["", [], [""], [[]]])
def test_empty_prompts_are_400(live, prompt):
    assert error_of(post(live, "/v1/completions", {**PROMPT, "prompt": prompt}), 400)["param"] == "prompt"


# ---- holes ------------------------------------------------------------------------------------------
def test_every_route_but_health_metrics_and_page_needs_the_key(live):
    for method, path in [("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/models"),
                         ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/v1/embeddings")]:
        response = httpx.request(method, live.base_url + path, json={"prompt": "hi", "tokens": [1]}, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert response.headers["www-authenticate"] == "Bearer"
    for path in ("/health", "/metrics", "/"):
        assert httpx.get(live.base_url + path, timeout=30).status_code == 200, path
    assert post(live, "/tokenize", {"prompt": "hi"}).status_code == 200


def test_the_key_is_checked_before_the_body(live):
    """An unauthenticated client learns nothing about the body and cannot make the server parse a large one."""
    for raw in (b'{"model": "smol", "messages": [}', b"x" * 300_000):
        response = httpx.post(live.base_url + "/v1/chat/completions", content=raw, timeout=30,
                              headers={"Content-Type": "application/json", "Authorization": "Bearer wrong"})
        assert response.status_code == 401


def test_chunked_body_over_the_limit_is_413(live):
    def chunks():
        yield b'{"model": "smol", "prompt": "'
        for _ in range(30):
            yield b"x" * 10_000
        yield b'"}'

    response = httpx.post(live.base_url + "/v1/completions", content=chunks(), timeout=30,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert error_of(response, 413)["code"] == "request_too_large"


def test_a_burst_of_streams_gets_exactly_the_rest_as_503(live, monkeypatch):
    """200 streams at once against a limit of 64: the first 64 admitted, exactly 136 refused with Retry-After,
    however late the admitted streams start in the engine."""
    server = live.app.state.server
    monkeypatch.setattr(server.config, "max_requests_in_flight", 64)
    runner, execute = live.engine.runner, live.engine.runner.execute

    def slow_execute(*args):
        time.sleep(0.02)   # keeps the admitted streams running while the burst arrives
        return execute(*args)

    monkeypatch.setattr(runner, "execute", slow_execute)
    body = {**CHAT, "max_tokens": 900, "ignore_eos": True, "stream": True}

    async def one(client):
        async with client.stream("POST", live.base_url + "/v1/chat/completions", json=body, headers=AUTH) as r:
            return r.status_code, r.headers.get("retry-after")

    async def burst():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(200)))

    statuses = asyncio.run(burst())
    assert sum(s == 200 for s, _ in statuses) == 64
    assert sum(s == 503 for s, _ in statuses) == 136
    assert all(retry == "1" for s, retry in statuses if s == 503)
    assert live.wait_idle(30), "the abandoned streams still hold blocks"
    deadline = time.time() + 10
    while server.num_admitted and time.time() < deadline:
        time.sleep(0.05)
    assert server.num_admitted == 0
