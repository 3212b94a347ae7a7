"""The engine core in its own process: killed under 64 streams, every request completes or ends with an
error (none hangs), /health turns 503 at once, the core restarts and serves with every block free; with
on_engine_failure=exit the server stops non-zero. A stalled step loop turns /health 503; SIGTERM drains. With
no compile flag the core serves at once and compiles its decode step in the background."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import free_port, make_engine

LONG_STREAM = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}


def core_config(model_path, **overrides):
    from effinfer.config import EngineConfig

    config = dict(model=str(model_path), dtype="float32", num_blocks=512, max_num_seqs=64, max_model_len=512,
                  show_progress=False, compile=False)   # the background compile has its own test
    return EngineConfig.from_kwargs(**{**config, **overrides})


class Served:
    """A `DrainingServer` on a thread (signals are sent by calling `request_stop`, as a handler would)."""

    def __init__(self, engine, **config):
        from effinfer.serving.api_server import DrainingServer, ServerConfig, build_app

        self.config = ServerConfig(port=free_port(), **config)
        self.server = DrainingServer(build_app(engine, self.config), self.config, log_level="warning")
        self.url = f"http://127.0.0.1:{self.config.port}"
        self.exit_code = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        self.exit_code = self.server.run()

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.uvicorn.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.uvicorn.should_exit = True
        self.thread.join(30)

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=10)


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, int]:
    """('done', tokens) for a stream that ended with a finish reason, ('error', tokens) for one that ended with
    an error event; either way it must end with [DONE]."""
    tokens, outcome = 0, None
    async with client.stream("POST", url + "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return "refused", 0
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    for line in lines[:-1]:
        if '"error"' in line:
            outcome = "error"
        elif '"finish_reason": "length"' in line:
            outcome = "done"
        tokens += 1
    return outcome, tokens


async def many_streams(url: str, count: int, body: dict, after=None) -> list[tuple[str, int]]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as client:
        tasks = [asyncio.create_task(stream_one(client, url, body)) for _ in range(count)]
        if after is not None:
            await after()
        return await asyncio.wait_for(asyncio.gather(*tasks), 180)


def test_killing_the_engine_process_under_load_loses_nothing(smollm2_path):
    from effinfer.serving.engine_core import ProcessEngine

    engine = ProcessEngine(core_config(smollm2_path), on_failure="restart")
    engine.start()
    try:
        with Served(engine) as served:
            first_pid = engine.pid

            async def kill_when_streaming():
                while engine.stats.num_running < 32:   # most requests are decoding when the core dies
                    await asyncio.sleep(0.05)
                os.kill(first_pid, signal.SIGKILL)
                deadline = time.monotonic() + 2
                while served.health().status_code != 503:
                    assert time.monotonic() < deadline, "/health did not turn 503 after the engine died"
                    await asyncio.sleep(0.01)

            results = asyncio.run(many_streams(served.url, 64, LONG_STREAM, kill_when_streaming))
            assert {outcome for outcome, _ in results} <= {"done", "error"}
            assert any(outcome == "error" for outcome, _ in results)
            deadline = time.time() + 120
            while served.health().status_code != 200:
                assert time.time() < deadline, "the engine did not come back"
                time.sleep(0.2)
            assert engine.pid != first_pid and engine.num_restarts == 1
            body = {**LONG_STREAM, "max_tokens": 16}
            results = asyncio.run(many_streams(served.url, 64, body))
            assert results == [("done", 16)] * 64
            deadline = time.time() + 10   # the idle core's heartbeat reports its pool
            while engine.stats.num_free_blocks != engine.stats.num_blocks or engine.stats.num_running:
                assert time.time() < deadline, "blocks were not freed"
                time.sleep(0.1)
    finally:
        engine.stop()


def test_engine_failure_exit_stops_the_server_non_zero(smollm2_path):
    from effinfer.serving.engine_core import ProcessEngine

    engine = ProcessEngine(core_config(smollm2_path, num_blocks=64), on_failure="exit")
    engine.start()
    try:
        served = Served(engine, on_engine_failure="exit")
        with served:
            os.kill(engine.pid, signal.SIGKILL)
            served.thread.join(30)
            assert not served.thread.is_alive() and served.exit_code == 1
    finally:
        engine.stop()


def test_an_engine_that_cannot_start_says_why(tmp_path):
    from effinfer.serving.engine_core import ProcessEngine

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    engine = ProcessEngine(core_config(broken))
    with pytest.raises(RuntimeError, match="could not start"):
        engine.start()
    engine.stop()


def test_a_stalled_engine_turns_health_503_and_logs_requests(smollm2_fp32, caplog):
    engine = make_engine(smollm2_fp32, num_blocks=64)
    release, step = threading.Event(), engine.step

    def stuck_step():
        release.wait(30)
        return step()

    engine.step = stuck_step
    with Served(engine, engine_stall_timeout=0.5) as served:
        assert served.health().status_code == 200
        caplog.set_level(logging.ERROR, "effinfer.serving")
        request = threading.Thread(target=httpx.post, args=(served.url + "/v1/completions",),
                                   kwargs={"json": {"prompt": "hi", "max_tokens": 2}, "timeout": 60})
        request.start()
        time.sleep(1.5)
        response = served.health()
        assert response.status_code == 503 and "no progress" in response.json()["reason"]
        assert any("no progress" in r.message and "cmpl-" in r.message for r in caplog.records)
        release.set()
        request.join(30)
        time.sleep(0.2)
        assert served.health().status_code == 200


def test_sigterm_drains_then_ends_streams_with_an_error(smollm2_fp32):
    engine = make_engine(smollm2_fp32, num_blocks=256)
    with Served(engine, drain_timeout=5.0) as served:
        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                long = asyncio.create_task(stream_one(client, served.url, {**LONG_STREAM, "max_tokens": 3000}))
                short = asyncio.create_task(client.post(served.url + "/v1/completions",
                                                        json={"prompt": "hi", "max_tokens": 8, "ignore_eos": True}))
                await asyncio.sleep(0.5)
                served.server.request_stop(signal.SIGTERM)
                await asyncio.sleep(0.2)
                refused = await client.post(served.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                health = await client.get(served.url + "/health")
                return await long, await short, refused, health

        (outcome, _), short, refused, health = asyncio.run(run())
        assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 8
        assert refused.status_code == 503 and health.status_code == 503
        assert outcome == "error"
        served.thread.join(30)
        assert not served.thread.is_alive()
    assert not engine.requests and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_the_core_exits_when_its_server_is_killed(smollm2_path, tmp_path):
    """SIGKILL of the server process (no handler runs) leaves no engine core behind."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "server.py"
    script.write_text(
        "import sys\n"
        "from effinfer.config import EngineConfig\n"
        "from effinfer.serving.engine_core import ProcessEngine\n"
        "if __name__ == '__main__':\n"
        f"    engine = ProcessEngine(EngineConfig.from_kwargs(model={str(smollm2_path)!r}, num_blocks=32, compile=False, show_progress=False))\n"
        "    engine.start()\n"
        "    print(engine.pid, flush=True)\n"
        "    sys.stdin.read()\n")
    server = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    core = None
    try:
        core = psutil.Process(int(server.stdout.readline()))
        server.kill()
        server.wait(10)
        core.wait(15)   # raises TimeoutExpired if the core lingers
    finally:
        server.kill()
        if core is not None and core.is_running():
            core.kill()


def test_the_core_compiles_in_the_background_while_it_serves(tmp_path):
    """With no compile flag the core answers at once (eager) and says when its decode steps run compiled:
    in its heartbeat, and so in /metrics."""
    from effinfer.serving.engine_core import ProcessEngine
    from tests.tiny_models import save_tiny_folder

    save_tiny_folder("llama", tmp_path)
    engine = ProcessEngine(core_config(tmp_path, compile=None, num_blocks=64, max_num_seqs=4, max_model_len=256))
    engine.start()
    try:
        assert engine.info.settings["compile"] == "background"
        with Served(engine) as served:
            body = {"prompt": [5, 6, 7], "max_tokens": 8, "ignore_eos": True}
            reply = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
            deadline = time.time() + 300
            while _metric(httpx.get(served.url + "/metrics").text, "effinfer:decode_steps_compiled") != 1.0:
                assert time.time() < deadline, "the decode step was not compiled"
                time.sleep(0.5)
            reply = httpx.post(served.url + "/v1/completions", json=body, timeout=60)
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 8
    finally:
        engine.stop()


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_the_api_process_imports_no_torch(smollm2_path):
    """What `effinfer serve` runs in its API process (parse flags, validate the config, start the core, load the
    tokenizer, build the app, check a request's grammar, detokenize a request's tokens) leaves torch unimported:
    the API process holds ~0.1 GB, not ~0.3 GB. The constrained request crosses to the core and back."""
    code = f"""
import asyncio, sys
from effinfer.cli import build_parser
from effinfer.cli_args import engine_kwargs
from effinfer.config import EngineConfig
from effinfer.decoding.grammar import check_grammar
from effinfer.sampling_params import SamplingParams, StructuredOutputParams
from effinfer.serving.api_server import ServerConfig, build_app
from effinfer.serving.engine_core import ProcessEngine

if __name__ == "__main__":
    args = build_parser().parse_args(["serve", "--model", {str(smollm2_path)!r}, "--kv-cache-dtype", "int8",
                                      "--attention-backend", "torch_ref", "--no-compile", "--num-blocks", "32"])
    engine = ProcessEngine(EngineConfig.from_kwargs(**engine_kwargs(args)))
    engine.start()
    build_app(engine, ServerConfig())

    choice = StructuredOutputParams(choice=["yes", "no"])
    check_grammar(choice)

    async def one():
        await engine.start_async()
        params = SamplingParams(max_tokens=8, ignore_eos=True, structured=choice)
        return [out async for _, out in engine.generate([1, 2, 3], [params], "r")][-1]

    print(asyncio.run(one()).text)
    engine.stop()
    print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    script = Path(tempfile.mkdtemp()) / "api.py"
    script.write_text(code)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() in (["yes", "[]"], ["no", "[]"]), out.stdout


def test_stop_strings_end_requests_here_and_free_them_in_the_core(smollm2_path):
    """Text and stop strings are made in the API process: the stream ends at the stop string (text cut where
    it starts) and the core is told to drop the request, long before its max_tokens."""
    from effinfer.sampling_params import SamplingParams
    from effinfer.serving.engine_core import ProcessEngine

    engine = ProcessEngine(core_config(smollm2_path, num_blocks=256, max_model_len=2048))
    engine.start()

    async def generate(params, rid):
        return [out async for _, out in engine.generate(engine.tokenizer.encode("The capital of France"), [params], rid)]

    async def run():
        await engine.start_async()
        full = (await generate(SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), "full"))[-1]
        stop = full.text[9:14]   # spans a token boundary, most likely: cut mid-word
        stopped = await generate(SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True, stop=[stop]), "stop")
        deadline = time.time() + 10   # 1500 tokens would take a minute: the core dropped the request
        while engine.stats.num_running or engine.stats.num_free_blocks != engine.stats.num_blocks:
            assert time.time() < deadline, "the core still runs the request a stop string ended"
            await asyncio.sleep(0.1)
        return full, stop, stopped

    try:
        full, stop, stopped = asyncio.run(run())
        final = stopped[-1]
        assert final.finished and final.finish_reason == "stop" and final.stop_reason == stop
        assert final.text == full.text[:full.text.index(stop)] == "".join(out.new_text for out in stopped)
        assert final.token_ids == full.token_ids[:len(final.token_ids)] and len(final.token_ids) < 24
    finally:
        engine.stop()
