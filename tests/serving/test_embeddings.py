"""/v1/embeddings and LLM.embed: the pooled final hidden states of the prompt, normalised, equal to a direct
forward of the model; batches, token-id input, both encodings (the SDK's default is base64), the pooling extra;
embedding requests batch with generation and leave no blocks behind."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import openai
import pytest
import torch

from helpers import API_KEY

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply today."]


def reference(engine, text: str, pooling: str = "mean") -> np.ndarray:
    """The model's final hidden states for the whole prompt, from one direct forward, pooled and normalised."""
    from effinfer.engine.offline import prepared_prompt

    with prepared_prompt(engine, engine.encode_prompt(text)) as (ids, positions, meta):
        hidden = engine.model(ids, positions, meta).float()
    pooled = hidden.mean(0) if pooling == "mean" else hidden[-1]
    return torch.nn.functional.normalize(pooled, dim=0).numpy()


def test_sdk_embeddings_equal_a_direct_forward(live, client):
    response = client.embeddings.create(model="smol", input=TEXTS)      # the SDK asks for base64
    vectors = [np.array(d.embedding) for d in response.data]
    assert [d.index for d in response.data] == [0, 1, 2] and len(vectors[0]) == 576
    assert response.usage.prompt_tokens == sum(len(live.engine.encode_prompt(t)) for t in TEXTS)
    expected = [reference(live.engine, t) for t in TEXTS]   # the engine is idle between requests
    for got, want in zip(vectors, expected):
        assert np.abs(got - want).max() < 1e-5
    similar, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert similar > unrelated


def test_float_encoding_token_ids_and_last_pooling(live):
    ids = live.engine.encode_prompt(TEXTS[0])
    body = {"model": "smol", "input": [ids], "encoding_format": "float", "pooling": "last"}
    data = httpx.post(live.base_url + "/v1/embeddings", json=body, headers=AUTH, timeout=60).json()["data"]
    assert np.abs(np.array(data[0]["embedding"]) - reference(live.engine, TEXTS[0], "last")).max() < 1e-5


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": "hi", "dimensions": 8}, "dimensions"),
    ({"input": "hi", "encoding_format": "hex"}, "encoding_format"), ({"input": "hi", "colour": 1}, "colour"),
    ({"input": "word " * 1500}, "input"),
])
def test_bad_embedding_requests_are_400(live, body, param):
    response = httpx.post(live.base_url + "/v1/embeddings", json={"model": "smol", **body}, headers=AUTH, timeout=60)
    assert response.status_code == 400, response.text
    assert param in (response.json()["error"]["param"] or "") or param in response.json()["error"]["message"]


def test_embeddings_batch_with_generation(live):
    async def both():
        client = openai.AsyncOpenAI(base_url=live.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        chat = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Count to ten."}],
                                              max_tokens=24, temperature=0.0)
        embeds = [client.embeddings.create(model="smol", input=TEXTS, encoding_format="float") for _ in range(4)]
        return await asyncio.gather(chat, *embeds)

    chat, *embeds = asyncio.run(both())
    assert chat.usage.completion_tokens == 24 or chat.choices[0].finish_reason == "stop"
    first = np.array([d.embedding for d in embeds[0].data])
    for other in embeds[1:]:
        assert np.abs(np.array([d.embedding for d in other.data]) - first).max() < 1e-4
    assert live.wait_idle()


def test_llm_embed_in_prompt_chunks(smollm2_path):
    """A prompt longer than the step's token budget runs in chunks; the pooled vector is the same."""
    from effinfer import LLM

    llm = LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.05,
              max_num_batched_tokens=16)
    texts = TEXTS + [" ".join(TEXTS * 4)]
    assert len(llm.engine.encode_prompt(texts[-1])) > 3 * 16
    vectors = llm.embed(texts) + llm.embed(texts[-1:], pooling="last")
    assert len(vectors) == 5 and all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    for got, (text, pooling) in zip(vectors[2:], [(TEXTS[2], "mean"), (texts[3], "mean"), (texts[3], "last")]):
        assert np.abs(np.array(got) - reference(llm.engine, text, pooling)).max() < 1e-5
    with pytest.raises(ValueError, match="pooling"):
        llm.embed(TEXTS, pooling="max")
