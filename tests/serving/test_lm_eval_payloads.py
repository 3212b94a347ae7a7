"""lm-eval's `local-completions` log-likelihood requests, as it sends and reads them (token-id prompts in a batch,
`echo`, `logprobs: 1`, `max_tokens: 1`; the continuation's log-probability is the sum of `token_logprobs[ctxlen:-1]`
and it is greedy when each equals its top alternative), reproduce the in-process scores per document."""

from __future__ import annotations

import httpx
import pytest

from helpers import API_KEY

PAIRS = [("The capital of France is", " Paris"), ("Two plus two equals", " four"),
         ("The opposite of hot is", " cold, as everyone knows")]


@pytest.fixture(scope="module")
def in_process(smollm2_path):
    from effinfer import LLM

    return LLM(str(smollm2_path), dtype="float32", quantization="none", show_progress=False, kv_cache_memory_gb=0.05)


def test_loglikelihoods_match_in_process_scores(live, in_process):
    tokenizer = in_process.tokenizer
    contexts = [tokenizer.encode(c) for c, _ in PAIRS]
    whole = [ctx + tokenizer.encode(cont, add_special_tokens=False) for ctx, (_, cont) in zip(contexts, PAIRS)]
    payload = {"model": "smol", "prompt": whole, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    response = httpx.post(live.base_url + "/v1/completions", json=payload, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    for choice, ctx, ids in zip(response.json()["choices"], contexts, whole):
        served = choice["logprobs"]["token_logprobs"][len(ctx):-1]
        tops = choice["logprobs"]["top_logprobs"][len(ctx):-1]
        scores = in_process.score(ids)                       # [len, vocab]: the next token after each position
        expected = [float(scores[p - 1, ids[p]]) for p in range(len(ctx), len(ids))]
        assert served == pytest.approx(expected, abs=1e-3)
        served_greedy = all(lp == max(top.values()) for lp, top in zip(served, tops))
        expected_greedy = all(int(scores[p - 1].argmax()) == ids[p] for p in range(len(ctx), len(ids)))
        assert served_greedy == expected_greedy


def test_chat_generation_matches_in_process(live, in_process):
    """lm-eval's `local-chat-completions` generate_until request: messages, greedy, its stop sequences, a seed."""
    from effinfer import SamplingParams

    messages = [{"role": "user", "content": "Question: What is the capital of Italy?\nAnswer:"}]
    payload = {"model": "smol", "messages": messages, "max_tokens": 32, "temperature": 0, "stop": ["\n\n"],
               "seed": 1234}
    response = httpx.post(live.base_url + "/v1/chat/completions", json=payload, timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 200, response.text
    expected = in_process.generate([messages], SamplingParams(max_tokens=32, temperature=0.0, stop=["\n\n"]),
                                   use_tqdm=False)[0].text
    assert response.json()["choices"][0]["message"]["content"] == expected
