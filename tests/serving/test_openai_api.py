"""The official `openai` SDK against a live server: both endpoints, streaming and not, the sampling
parameters, usage counts, logprobs and echo, and the SSE invariants."""

from __future__ import annotations

import math

import httpx
import pytest

from helpers import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
GREEDY = dict(temperature=0.0, max_tokens=12)
MESSAGES = [{"role": "user", "content": "Name three fruits."}]


def prompt_tokens(live, **body) -> int:
    return httpx.post(live.base_url + "/tokenize", json=body, headers=AUTH).json()["count"]


def test_models_and_health(client, live):
    models = client.models.list()
    assert [m.id for m in models.data] == ["smol"]
    assert httpx.get(live.base_url + "/health").json() == {"status": "ok"}


def test_completion_non_streaming(client, live):
    out = client.completions.create(model="smol", prompt="The capital of France is", **GREEDY)
    choice = out.choices[0]
    assert "Paris" in choice.text
    assert choice.finish_reason == "length"
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == prompt_tokens(live, prompt="The capital of France is")
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12


def test_chat_non_streaming_stops_at_eos(client, live):
    out = client.chat.completions.create(model="smol", messages=MESSAGES, temperature=0.0, max_tokens=200)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "stop"
    assert out.usage.prompt_tokens == prompt_tokens(live, messages=MESSAGES)


def test_chat_stream_invariants_and_equal_text(client):
    full = client.chat.completions.create(model="smol", messages=MESSAGES, **GREEDY).choices[0].message.content
    chunks = list(client.chat.completions.create(model="smol", messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model="smol", prompt="Once upon a time", **GREEDY).choices[0].text
    chunks = list(client.completions.create(model="smol", prompt="Once upon a time", stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_token_id_prompt_and_batch_of_prompts(client, live):
    ids = httpx.post(live.base_url + "/tokenize", json={"prompt": "The capital of France is"},
                     headers=AUTH).json()["tokens"]
    by_ids = client.completions.create(model="smol", prompt=ids, **GREEDY).choices[0].text
    batch = client.completions.create(model="smol", prompt=["The capital of France is", "1, 2, 3,"], **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == by_ids


def test_n_samples_with_seed(client):
    out = client.chat.completions.create(model="smol", messages=MESSAGES, n=4, seed=7, temperature=1.0, max_tokens=16)
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert len({c.message.content for c in out.choices}) > 1
    again = client.chat.completions.create(model="smol", messages=MESSAGES, n=4, seed=7, temperature=1.0, max_tokens=16)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]


def test_seed_reproducibility(client):
    make = lambda seed: client.completions.create(  # noqa: E731
        model="smol", prompt="My favourite animal is", seed=seed, temperature=1.0, top_p=0.9, max_tokens=20).choices[0].text
    assert make(123) == make(123)
    assert len({make(s) for s in (1, 2, 3)}) > 1


def test_stop_string_is_cut(client):
    full = client.completions.create(model="smol", prompt="1, 2, 3, 4,", temperature=0.0, max_tokens=20).choices[0].text
    stop = full.strip().split(",")[1].strip()     # e.g. "6"
    out = client.completions.create(model="smol", prompt="1, 2, 3, 4,", temperature=0.0, max_tokens=20, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == full[:full.index(stop)]


def test_chat_logprobs(client):
    out = client.chat.completions.create(model="smol", messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY)
    content = out.choices[0].logprobs.content
    assert len(content) == 12
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)   # greedy: the top token
        assert entry.logprob <= 0


def test_completion_echo_with_logprobs_scores_the_prompt(client):
    prompt = "The capital of France is Paris"
    out = client.completions.create(model="smol", prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0.0)
    lp = out.choices[0].logprobs
    num_prompt = out.usage.prompt_tokens
    assert out.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == num_prompt + 1
    assert lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert math.isfinite(sum(lp.token_logprobs[1:]))


def test_vllm_extras_accepted(client):
    out = client.completions.create(model="smol", prompt="Hello", max_tokens=8, temperature=0.8,
                                    extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True})
    assert out.usage.completion_tokens == 8


def test_tokenize_detokenize_roundtrip(live):
    ids = httpx.post(live.base_url + "/tokenize", json={"prompt": "héllo wörld 🤖", "add_special_tokens": False},
                     headers=AUTH).json()
    text = httpx.post(live.base_url + "/detokenize", json={"tokens": ids["tokens"]}, headers=AUTH).json()["prompt"]
    assert text == "héllo wörld 🤖"
    assert ids["max_model_len"] == 1024


def test_metrics_report_requests(client, live):
    client.completions.create(model="smol", prompt="Hi", **GREEDY)
    text = httpx.get(live.base_url + "/metrics").text
    for name in ("effinfer:num_requests_running", "effinfer:kv_cache_usage_perc", "effinfer:prefix_cache_hit_rate",
                 "effinfer:generation_tokens_total", "effinfer:time_to_first_token_seconds_bucket",
                 "effinfer:time_per_output_token_seconds_bucket", "effinfer:e2e_request_latency_seconds_count",
                 "effinfer:request_queue_time_seconds_count", "effinfer:num_preemptions_total"):
        assert name in text, name
    count = [l for l in text.splitlines() if l.startswith("effinfer:e2e_request_latency_seconds_count")][0]
    assert float(count.split()[-1]) >= 1


def test_chat_page_is_served(live):
    page = httpx.get(live.base_url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text
    assert "http://" not in page.text and "https://" not in page.text     # no CDN, nothing external
