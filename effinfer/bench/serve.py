"""`effinfer bench serve`: load any OpenAI-compatible endpoint (effinfer, llama.cpp's server, vLLM)
with streamed /v1/completions requests and report TTFT, TPOT, ITL and E2EL like `vllm bench serve`.

Arrivals follow a gamma process at `request_rate` requests/s (burstiness 1.0 is Poisson; inf sends
all at once), optionally capped at `max_concurrency` requests in flight. Every request asks for
exactly `output_len` tokens (`ignore_eos`) so runs compare; failures are counted with their message.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np

from effinfer.bench.metrics import RequestResult
from effinfer.bench.workloads import BenchRequest


@dataclass
class ServeConfig:
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    """Model id to send (default: the first one /v1/models lists)."""
    request_rate: float = float("inf")
    burstiness: float = 1.0
    max_concurrency: int | None = None
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 600.0


async def run_serve_benchmark(requests: list[BenchRequest], cfg: ServeConfig,
                              show_progress: bool = True) -> tuple[list[RequestResult], float]:
    """-> (one result per request, wall-clock duration of the run in seconds)."""
    import httpx
    from tqdm.auto import tqdm

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.max_concurrency or len(requests) or 1)
    async with httpx.AsyncClient(base_url=cfg.base_url, headers=headers, timeout=cfg.timeout_s, limits=limits) as client:
        model = cfg.model or await _first_model(client)
        gate = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = tqdm(total=len(requests), desc="bench serve", unit="req", disable=not show_progress, leave=False)
        start = time.perf_counter()
        tasks = []
        for request, delay in zip(requests, arrival_delays(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)):
            await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_limited(gate, client, model, request, bar)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration


def arrival_delays(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps before each request: gamma-distributed with mean 1/rate (shape = burstiness)."""
    if count == 0 or rate == float("inf"):
        return [0.0] * count
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"request_rate={rate} and burstiness={burstiness} must be positive")
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count).tolist()


async def _first_model(client) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def _limited(gate, client, model, request, bar) -> RequestResult:
    if gate is None:
        result = await send_one(client, model, request)
    else:
        async with gate:
            result = await send_one(client, model, request)
    bar.update(1)
    return result


async def send_one(client, model: str, request: BenchRequest) -> RequestResult:
    """One streamed completion; times each chunk that carries text."""
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "stream": True,
            "temperature": 0.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    result = RequestResult(success=False, prompt_len=request.prompt_len)
    start = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                event = _parse_sse(line)
                if event is None:
                    continue
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                if event.get("usage"):  # the server's own counts beat our estimate
                    result.output_len = event["usage"]["completion_tokens"]
                    result.prompt_len = event["usage"]["prompt_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
    except Exception as exc:  # counted as a failure with its message; the run goes on
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.latency = last - start
    result.output_len = result.output_len or chunks
    result.success = chunks > 0
    result.error = "" if chunks else "no tokens received"
    return result


def _parse_sse(line: str) -> dict | None:
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    return None if data == "[DONE]" else json.loads(data)
