"""Bad input gets its documented status and an OpenAI error object; disconnects free their blocks;
64 concurrent streams all complete correctly; an internal error fails one request, not the server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from helpers import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(live, path, body=None, headers=AUTH, raw=None):
    return httpx.post(live.base_url + path, json=body, content=raw, timeout=60,
                      headers={**headers, **({"Content-Type": "application/json"} if raw is not None else {})})


def assert_error(response, status, param=None, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


CHAT = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("body, status, param", [
    ({**CHAT, "temperature": -1}, 400, "temperature"),
    ({**CHAT, "top_p": 2}, 400, "top_p"),
    ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": "many"}, 400, "max_tokens"),
    ({**CHAT, "n": 100}, 400, "n"),
    ({**CHAT, "messages": []}, 400, "messages"),
    ({**CHAT, "messages": "hello"}, 400, "messages"),
    ({"model": "smol"}, 400, "messages"),
    ({**CHAT, "logprobs": True, "top_logprobs": 50}, 400, "logprobs"),
    ({**CHAT, "presence_penalty": 5}, 400, "presence_penalty"),
])
def test_invalid_chat_values(live, body, status, param):
    assert_error(post(live, "/v1/chat/completions", body), status, param)


def test_malformed_json(live):
    assert_error(post(live, "/v1/chat/completions", raw=b'{"model": "smol", "messages": [}'), 400)


def test_unknown_model_is_404(live):
    assert_error(post(live, "/v1/chat/completions", {**CHAT, "model": "gpt-4"}), 404, "model", "model_not_found")


def test_context_too_long(live):
    long_prompt = "word " * 1500
    assert_error(post(live, "/v1/completions", {"model": "smol", "prompt": long_prompt}), 400,
                 code="context_length_exceeded")
    assert_error(post(live, "/v1/completions", {"model": "smol", "prompt": "hi there", "max_tokens": 1024}), 400,
                 code="context_length_exceeded")


def test_bad_token_ids(live):
    assert_error(post(live, "/v1/completions", {"model": "smol", "prompt": [1, 2, 10**9]}), 400, "prompt")
    assert_error(post(live, "/detokenize", {"tokens": [-5]}), 400, "tokens")


def test_api_key_required_on_v1_routes(live):
    for path, body in [("/v1/chat/completions", CHAT), ("/v1/completions", {"prompt": "hi"})]:
        assert_error(post(live, path, body, headers={}), 401, code="invalid_api_key")
        assert_error(post(live, path, body, headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(live.base_url + "/v1/models").status_code == 401
    assert post(live, "/v1/chat/completions", CHAT, headers={"Authorization": "Bearer second-key"}).status_code == 200


def test_body_too_large(live):
    assert_error(post(live, "/v1/completions", {"model": "smol", "prompt": "x" * 300_000}), 413)


def test_unknown_route_has_error_object(live):
    assert_error(httpx.get(live.base_url + "/v1/nothing", headers=AUTH), 404)
    assert_error(httpx.get(live.base_url + "/v1/nothing"), 401)   # the key is checked first


def test_queue_full_is_503_with_retry_after(live):
    server = live.app.state.server
    server.num_admitted += 96           # as if 96 sequences were already admitted
    try:
        response = post(live, "/v1/chat/completions", CHAT)
        assert_error(response, 503, code="server_overloaded")
        assert response.headers["retry-after"] == "1"
    finally:
        server.num_admitted -= 96


def test_internal_error_fails_one_request_and_server_lives(live, monkeypatch):
    runner = live.engine.runner
    original = runner.execute
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated kernel failure")
        return original(*args)

    monkeypatch.setattr(runner, "execute", flaky)
    error = assert_error(post(live, "/v1/chat/completions", CHAT), 500)
    assert "simulated" not in error["message"]
    assert post(live, "/v1/chat/completions", CHAT).status_code == 200
    assert live.wait_idle()


def test_disconnect_mid_stream_frees_blocks(live):
    body = {**CHAT, "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", live.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert live.engine.requests, "the request should be running"
    assert live.wait_idle(), "aborted request still holds blocks"


def test_disconnect_non_streaming_frees_blocks(live):
    body = {**CHAT, "max_tokens": 800, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.base_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=1.5)
    assert live.wait_idle(), "abandoned request still holds blocks"


def test_64_concurrent_streams_complete_correctly(live):
    prompts = [f"Write the number {i} in words:" for i in range(8)]
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    reference = {p: client.completions.create(model="smol", prompt=p, temperature=0.0, max_tokens=16) for p in prompts}
    expected = {p: (r.choices[0].text, r.usage.completion_tokens, r.choices[0].finish_reason)
                for p, r in reference.items()}

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model="smol", prompt=prompt, temperature=0.0, max_tokens=16,
                                                  stream=True, stream_options={"include_usage": True})
        text, ids, usage, finish = "", set(), None, None
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return prompt, text, ids, usage, finish

    async def main():
        aclient = openai.AsyncOpenAI(base_url=live.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*(one(aclient, prompts[i % 8]) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for prompt, text, ids, usage, finish in results:
        assert (text, usage.completion_tokens, finish) == expected[prompt]
        assert len(ids) == 1
    assert live.wait_idle()


def test_graceful_shutdown_aborts_in_flight_streams(smollm2_fp32):
    """A server stopping with a long stream in flight ends it within its grace period and frees every block."""
    import threading

    import uvicorn

    from effinfer.serving.api_server import ServerConfig, build_app
    from helpers import free_port, make_engine

    engine = make_engine(smollm2_fp32, num_blocks=128)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, ServerConfig(port=port)), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.05)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        server.should_exit = True
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, StopIteration)):
            for _ in range(100_000):
                next(lines)
            raise StopIteration
    thread.join(20)
    assert not thread.is_alive(), "server did not shut down"
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
