"""Property-based fuzzing of the live server from its own OpenAPI schema (schemathesis on hypothesis): 2,160
generated requests, valid and deliberately invalid, get no 5xx and no hang; every error is an OpenAI error
object; afterwards the engine holds no request and no block. A tiny random-weight model with a short context
keeps each generation short."""

from __future__ import annotations

import pytest

from helpers import API_KEY, LiveServer, free_port, make_engine
from tiny_models import save_tiny_folder

schemathesis = pytest.importorskip("schemathesis", reason="the test extra (schemathesis) is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (hypothesis comes with schemathesis)

AUTH = {"Authorization": f"Bearer {API_KEY}"}
# examples per operation and generation mode: 2 x (420 + 420 + 80 + 80 + 80) = 2,160 requests
EXAMPLES = {"POST /v1/completions": 420, "POST /v1/chat/completions": 420, "POST /tokenize": 80,
            "POST /detokenize": 80, "POST /v1/embeddings": 80}
TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}" \
           "assistant{% endif %}"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from effinfer.models import load_model
    from effinfer.serving.api_server import ServerConfig

    folder = tmp_path_factory.mktemp("tiny")
    save_tiny_folder("llama", folder)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    import torch

    engine = make_engine(load_model(str(folder), torch.float32, show_progress=False), num_blocks=64,
                         max_num_seqs=16, max_model_len=48)
    config = ServerConfig(port=free_port(), api_keys=[API_KEY], served_model_name="tiny", max_n=4,
                          max_requests_in_flight=32, max_body_bytes=100_000)
    with LiveServer(engine, config) as server:
        yield server


# ranges that SamplingParams accepts (the schema leaves the checks to it), so that "valid" examples get through
BOUNDS = {"temperature": (0, 2), "top_p": (0.01, 1), "min_p": (0, 1), "presence_penalty": (-2, 2),
          "frequency_penalty": (-2, 2), "repetition_penalty": (0.5, 2), "top_k": (-1, 50), "max_tokens": (1, 8),
          "max_completion_tokens": (1, 8), "n": (1, 4), "best_of": (1, 1), "logprobs": (0, 5),
          "top_logprobs": (0, 5), "min_tokens": (0, 1), "early_exit_threshold": None, "dimensions": None}
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "audio", "modalities", "prediction",
               "web_search_options", "response_format", "suffix"}


def focused(openapi: dict) -> dict:
    """The server's schema, narrowed so that "valid" examples reach the engine more often than a 400 or 404
    would let them: no extra fields, the served model's name, values in range, no refused features
    (negative examples still break all of these)."""
    for component in openapi["components"]["schemas"].values():
        properties = component.get("properties")
        if not properties:
            continue
        component["additionalProperties"] = False
        for name in list(properties):
            if name in UNSUPPORTED or (name in BOUNDS and BOUNDS[name] is None):
                del properties[name]
            elif name == "content" and component.get("title") == "ChatMessage":
                properties[name] = {"type": "string"}
                component["required"] = ["role", "content"]
            elif name == "tokens":
                properties[name] = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 255}}
            elif name == "model":
                properties[name] = {"anyOf": [{"const": "tiny"}, {"type": "null"}]}
            elif name in BOUNDS and not (name == "logprobs" and component.get("title") == "ChatCompletionRequest"):
                low, high = BOUNDS[name]
                kind = "integer" if isinstance(low, int) and isinstance(high, int) else "number"
                properties[name] = {"type": kind, "minimum": low, "maximum": high}
    return openapi


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("label", sorted(EXAMPLES))
def test_fuzzed_requests_get_no_server_error(fuzz_server, label, mode):
    schema = schemathesis.openapi.from_dict(focused(fuzz_server.app.openapi()))
    operation = next(r.ok() for r in schema.get_all_operations() if r.ok().label == label)
    strategy = operation.as_strategy(schemathesis.GenerationMode(mode))
    calls = []

    @settings(max_examples=EXAMPLES[label], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case):
        response = case.call(base_url=fuzz_server.base_url, headers=AUTH, timeout=30)
        calls.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text)
        if response.status_code >= 400:
            assert response.json()["error"]["message"], response.text

    check()
    assert len(calls) >= EXAMPLES[label] // 2        # hypothesis ran the examples (duplicates are skipped)
    if mode == "positive":
        assert calls.count(200) >= len(calls) // 10, "too few valid examples reached the engine"
    assert fuzz_server.wait_idle(30), "a fuzzed request left a request or blocks behind"
