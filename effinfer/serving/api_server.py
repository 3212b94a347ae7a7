"""The OpenAI-compatible HTTP server (FastAPI) in front of an engine client (`serving.async_engine`).

Routes: POST /v1/completions, POST /v1/chat/completions (streaming and not), POST /v1/embeddings, GET /v1/models,
GET /health, GET /metrics, POST /tokenize, POST /detokenize, GET / (a small chat page).
Every bad input gets an OpenAI error object with a 4xx status; internal errors a 500 without a
traceback. Limits on body size, prompt length, max_tokens, n and requests in flight keep one client
from taking the server down. `/health` is the engine's liveness: 503 while it is dead, restarting,
stalled or the server drains. On SIGTERM (`serve`) the server stops admitting, lets the requests in
flight finish for `drain_timeout` seconds, then ends the rest with an error (streams: an error event and
`[DONE]`).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hmac
import logging
import struct
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from effinfer.decoding.grammar import check_grammar
from effinfer.outputs import RequestOutput
from effinfer.prompts import check_token_params, encode_prompt
from effinfer.sampling_params import MAX_LOGPROBS, SamplingParams, StructuredOutputParams
from effinfer.serving.replicas import ROUTING
from effinfer.serving.async_engine import (EngineClient, EngineDeadError, EngineRequestError, ThreadEngine,
                                           check_failure_policy)
from effinfer.serving.metrics import ServerMetrics
from effinfer.serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, EmbeddingRequest,
                                       OpenAIError, OpenAIRequest, SamplingRequest, TokenizeRequest, new_id, now)
from effinfer.serving.responses import LogprobFormatter, chat_choice, completion_choice, sse, usage
from effinfer.serving.tool_calls import ChatDeltas, forced_constraint, parser_for

log = logging.getLogger("effinfer.serving")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind; 127.0.0.1 unless you mean to expose the server."""
    port: int = 8000
    """TCP port to listen on."""
    api_keys: list[str] = field(default_factory=list)
    """Accepted bearer tokens for /v1 routes; empty means no authentication."""
    served_model_name: str | None = None
    """The model id clients send and /v1/models lists (default: the model argument)."""
    max_body_bytes: int = 4 << 20
    """Largest request body accepted (bytes); a larger one gets 413 before it is read whole."""
    max_tokens_limit: int | None = None
    """Largest max_tokens a request may ask for (default: the context length)."""
    max_n: int = 16
    """Most choices (`n`) one request may ask for."""
    strict_fields: bool = True
    """Unknown request fields get 400 naming them (as OpenAI answers); off: they are ignored (lenient mode)."""
    max_requests_in_flight: int = 256
    """More concurrent sequences than this get 503 with Retry-After."""
    engine_process: bool = True
    """Run the engine core in its own process (serve); off: on a thread of the HTTP process."""
    on_engine_failure: str = "restart"
    """When the engine process dies: restart it, or exit (non-zero) so a supervisor restarts the server."""
    engine_stall_timeout: float = 60.0
    """Seconds without progress from a busy engine before /health says 503 and the requests in flight are logged."""
    drain_timeout: float = 30.0
    """On SIGTERM: seconds the requests in flight get to finish before they end with an error."""
    replicas: int = 1
    """Engine replicas behind this endpoint, each a Ray actor with its own engine (Ray restarts one that dies)."""
    routing: str = "prefix"
    """How requests pick a replica: prefix (the one likely to hold the prompt's prefix in cache, unless it is much
    busier), least_loaded or round_robin."""
    ray_address: str | None = None
    """An existing Ray cluster for the replicas (head-ip:6379, or auto for the one on this machine; with Ray's token
    authentication, RAY_AUTH_MODE=token and the cluster's token); default: a local one, started here."""

    def __post_init__(self) -> None:
        check_failure_policy(self.on_engine_failure)
        if self.replicas < 1:
            raise ValueError(f"replicas={self.replicas} must be at least 1")
        if (self.replicas > 1 or self.ray_address) and not self.engine_process:
            raise ValueError("replicas run their engines on Ray; drop --no-engine-process")
        if self.routing not in ROUTING:
            raise ValueError(f"routing={self.routing!r} is not supported; choose from {', '.join(ROUTING)}")
        for name in ("engine_stall_timeout", "drain_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")


class OpenAIServer:
    def __init__(self, engine: EngineClient, tokenizer, config: ServerConfig):
        self.async_engine, self.tokenizer, self.config = engine, tokenizer, config
        info = engine.info
        self.model_name = config.served_model_name or info.model
        self.metrics = ServerMetrics(self.model_name, info.spec_method, info.exit_layers, info.settings)
        engine.on_step = self.metrics.on_step
        self.logprobs = LogprobFormatter(self.tokenizer)
        self.max_model_len, self.vocab_size = info.max_model_len, info.vocab_size
        self.draining = False
        self.num_admitted = 0
        """Sequences of the requests admitted and not yet answered (the in-flight limit counts these)."""

    # ---- validation ----------------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise OpenAIError(f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                              404, param="model", code="model_not_found")

    def encode(self, prompt, param: str = "prompt") -> list[int]:
        try:
            ids = encode_prompt(self.tokenizer, self.vocab_size, prompt)
        except (ValueError, TypeError) as exc:
            raise OpenAIError(str(exc), param=param) from exc
        if not ids:
            raise OpenAIError(f"the {param} is empty (it encodes to no tokens)", param=param)
        return ids

    def encode_fim(self, prompt, suffix: str) -> list[int]:
        """Fill in the middle: the prompt before the gap, `suffix` after it, in the model's FIM tokens."""
        if not isinstance(prompt, str):
            raise OpenAIError("suffix needs a text prompt", param="suffix")
        try:
            return self.tokenizer.encode_fim(prompt, suffix)
        except ValueError as exc:
            raise OpenAIError(str(exc), param="suffix") from exc

    def check_lengths(self, num_prompt: int, max_tokens: int | None) -> int:
        """The max_tokens to use; 400 when the prompt plus requested tokens exceed the context."""
        room = self.max_model_len - num_prompt
        if room < 1:
            raise self._context_error(num_prompt, max_tokens or 1)
        limit = self.config.max_tokens_limit or self.max_model_len
        if max_tokens is not None and max_tokens > limit:
            raise OpenAIError(f"max_tokens={max_tokens} exceeds this server's limit of {limit}", param="max_tokens")
        if max_tokens is not None and num_prompt + max_tokens > self.max_model_len:
            raise self._context_error(num_prompt, max_tokens)
        return max_tokens if max_tokens is not None else room

    def _context_error(self, num_prompt: int, max_tokens: int) -> OpenAIError:
        return OpenAIError(
            f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.", param="messages", code="context_length_exceeded")

    @functools.cached_property
    def tool_parser(self):
        """The reader of the tool calls this model's chat template asks for (None: no known format)."""
        return parser_for(self.tokenizer.chat_template)

    def check_fields(self, req: SamplingRequest) -> None:
        """400 naming the fields this server does not implement, and (unless lenient) the unknown ones."""
        unsupported = req.unsupported_fields()
        if unsupported:
            name, feature = unsupported[0]
            raise OpenAIError(f"{feature} is not supported by this server (field {name!r})", param=name,
                              code="unsupported_parameter")
        self.check_unknown_fields(req)

    def check_unknown_fields(self, req: OpenAIRequest) -> None:
        unknown = req.unknown_fields()
        if unknown and self.config.strict_fields:
            raise OpenAIError(f"unknown field{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)} (start the "
                              "server with --no-strict-fields to ignore unknown fields)", param=unknown[0],
                              code="unknown_parameter")

    def sampling_params(self, req: SamplingRequest, max_tokens: int, logprobs: int | None,
                        prompt_logprobs: int | None = None, forced: StructuredOutputParams | None = None
                        ) -> list[SamplingParams]:
        """The request's sampling parameters, one per sample; `forced`: the output constraint that tool_choice
        "required" or a named function needs."""
        if req.n > self.config.max_n:
            raise OpenAIError(f"n={req.n} exceeds this server's limit of {self.config.max_n}", param="n")
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise OpenAIError(f"logprobs={logprobs} exceeds the limit of {MAX_LOGPROBS}", param="logprobs")
        try:
            params = req.sampling_params(max_tokens, logprobs, prompt_logprobs)
            check_token_params(params, self.vocab_size)
        except ValueError as exc:
            raise OpenAIError(str(exc), param=str(exc).split("=")[0].split(" ")[0].rstrip(":")) from exc
        if forced is not None:
            if params.structured is not None:
                raise OpenAIError(f"{_constraint_field(req)}: give one output constraint; tool_choice "
                                  f"{req.tool_choice!r} already constrains the answer", param="tool_choice")
            params = dataclasses.replace(params, structured=forced)
        if params.structured is not None:
            try:
                check_grammar(params.structured)
            except ValueError as exc:
                field = "tools" if forced is not None else _constraint_field(req)
                raise OpenAIError(str(exc), param=field, code="invalid_structured_output") from exc
        return [params.for_sample(k) for k in range(req.n)]

    def admit(self, num_sequences: int) -> "Admission":
        """Reserve room for a request's sequences from admission until its response ends, so that a burst
        of streams cannot pass the in-flight limit before their engine requests start."""
        if self.draining:
            raise OpenAIError("the server is shutting down", 503, "server_error", code="server_shutting_down")
        if num_sequences > self.config.max_requests_in_flight:   # would never fit: retrying cannot help
            raise OpenAIError(f"this request has {num_sequences} sequences (prompts x n); the server runs at most "
                              f"{self.config.max_requests_in_flight} at once: split it", code="too_many_sequences")
        if self.num_admitted + num_sequences > self.config.max_requests_in_flight:
            raise OpenAIError("the server is at capacity; retry shortly", 503, "server_overloaded",
                              code="server_overloaded", headers={"Retry-After": "1"})
        self.num_admitted += num_sequences
        return Admission(self, num_sequences)

    async def respond_admitted(self, num_sequences: int, respond) -> object:
        """Run `respond()` holding an admission; a stream holds it until the stream ends."""
        admission = self.admit(num_sequences)
        try:
            response = await respond()
        except BaseException:
            admission.release()
            raise
        if isinstance(response, EventStream):
            response.admission = admission
        else:
            admission.release()
        return response

    # ---- running requests ----------------------------------------------------------------------------
    async def run_prompts(self, prompts: list[list[int]], params: list[SamplingParams], rid: str, priority: int = 0
                          ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """All samples of all prompts at once; yields (choice index, output delta). The engine's request ids
        start with the response's id and end with a part of their own (a client's request_id may repeat)."""
        n, rid = len(params), f"{rid}.{uuid.uuid4().hex[:8]}"
        streams = [self.async_engine.generate(ids, params, f"{rid}-{i}", priority) for i, ids in enumerate(prompts)]
        async for prompt_index, (k, out) in merge(streams):
            yield prompt_index * n + k, out

    def health(self) -> str | None:
        return "the server is shutting down" if self.draining else self.async_engine.health()

    async def drain(self, timeout: float) -> None:
        """Stop admitting; give the requests in flight `timeout` seconds, then end the rest with an error."""
        self.draining = True
        deadline = asyncio.get_running_loop().time() + timeout
        while (self.async_engine.num_in_flight or self.num_admitted) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self.async_engine.num_in_flight:
            log.warning("drain timeout: ending %d requests still in flight", self.async_engine.num_in_flight)
            self.async_engine.fail_all(EngineDeadError("the server is shutting down; the request did not finish "
                                                       f"within the drain timeout ({timeout:g} s)"))
            for _ in range(100):   # let the handlers write their error events and [DONE]
                if not self.async_engine.num_in_flight:
                    break
                await asyncio.sleep(0.01)

    async def collect(self, request: Request, stream: AsyncIterator) -> dict[int, RequestOutput]:
        """Final outputs by choice index; abandons (and so aborts) the work if the client disconnects."""
        async def consume():
            finals = {}
            async for index, out in stream:
                if out.finished:
                    finals[index] = out
            return finals

        task = asyncio.create_task(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError()
        return task.result()


def _constraint_field(req: SamplingRequest) -> str:
    return next(name for name in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                                  "guided_choice", "guided_grammar") if getattr(req, name) is not None)


class Admission:
    """Room held for one request's sequences; released once."""

    def __init__(self, server: OpenAIServer, num_sequences: int):
        self.server, self.num_sequences = server, num_sequences

    def release(self) -> None:
        self.server.num_admitted -= self.num_sequences
        self.num_sequences = 0


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators as (iterator index, item); errors propagate, and leaving
    early cancels every pump (which closes the iterators and aborts their requests)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---- /v1/completions -----------------------------------------------------------------------------
async def create_completion(server: OpenAIServer, req: CompletionRequest, request: Request):
    server.check_model(req.model)
    server.check_fields(req)
    raw_prompts = _completion_prompts(req.prompt)
    prompts = [server.encode_fim(p, req.suffix) if req.suffix else server.encode(p) for p in raw_prompts]
    max_tokens = req.max_tokens or 16   # OpenAI's default for completions
    for ids in prompts:
        server.check_lengths(len(ids), max_tokens)
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    params = server.sampling_params(req, max_tokens, req.logprobs, echo_logprobs)

    async def respond():
        rid, created = req.request_id or new_id("cmpl"), now()
        echo_text = [p if isinstance(p, str) else server.tokenizer.decode(ids)
                     for p, ids in zip(raw_prompts, prompts)] if req.echo else None
        stream = server.run_prompts(prompts, params, rid, req.priority)
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.model_name}
        if req.stream:
            return _sse_response(_completion_chunks(server, req, stream, head, prompts, echo_text))
        finals = await server.collect(request, stream)
        choices = [_completion_final(server, req, i, finals[i], prompts[i // req.n], echo_text) for i in sorted(finals)]
        num_completion = sum(len(o.token_ids) for o in finals.values())
        return {**head, "choices": choices, "usage": usage(sum(map(len, prompts)), num_completion)}

    return await server.respond_admitted(len(prompts) * req.n, respond)


def _completion_prompts(prompt, param: str = "prompt") -> list:
    """OpenAI's four prompt shapes -> a list of prompts (strings or token-id lists)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    if not prompt:
        raise OpenAIError(f"{param} must not be empty", param=param)
    return list(prompt)


def _completion_final(server, req, index, out, prompt_ids, echo_text) -> dict:
    text = out.text
    logprobs = None
    if req.logprobs is not None:
        ids, lps = out.token_ids, out.logprobs
        if req.echo:
            ids, lps = prompt_ids + ids, (out.prompt_logprobs or []) + lps
        logprobs = server.logprobs.completion(ids, lps, 0)
    if echo_text is not None:
        text = echo_text[index // req.n] + text
    return completion_choice(index, out, text, logprobs)


async def _completion_chunks(server, req, stream, head, prompts, echo_text) -> AsyncIterator[str]:
    offsets: dict[int, int] = {}
    num_completion = 0
    async for index, out in stream:
        first = index not in offsets
        text = out.new_text
        ids, lps = out.new_token_ids, (out.logprobs or [])[len(out.token_ids) - len(out.new_token_ids):]
        if first and echo_text is not None:
            text = echo_text[index // req.n] + text
            ids, lps = prompts[index // req.n] + ids, (out.prompt_logprobs or []) + lps
        offsets.setdefault(index, 0)
        logprobs = server.logprobs.completion(ids, lps, offsets[index]) if req.logprobs is not None else None
        offsets[index] += len(text)
        num_completion += len(out.new_token_ids)
        if text or out.finished or logprobs:
            choice = completion_choice(index, out, text, logprobs)
            choice["finish_reason"] = out.finish_reason if out.finished else None
            yield sse({**head, "choices": [choice], **({"usage": None} if req.include_usage else {})})
    if req.include_usage:
        yield sse({**head, "choices": [], "usage": usage(sum(map(len, prompts)), num_completion)})


# ---- /v1/embeddings ------------------------------------------------------------------------------
async def create_embeddings(server: OpenAIServer, req: EmbeddingRequest, request: Request):
    server.check_model(req.model)
    server.check_unknown_fields(req)
    width = server.async_engine.info.hidden_size
    if req.dimensions is not None and req.dimensions != width:
        raise OpenAIError(f"this model's embeddings have {width} dimensions and it was not trained for shorter "
                          "ones; leave out dimensions", param="dimensions")
    prompts = [server.encode(p, "input") for p in _completion_prompts(req.input, "input")]
    for ids in prompts:
        if len(ids) >= server.max_model_len:
            raise OpenAIError(f"an input has {len(ids)} tokens; this model's context holds {server.max_model_len - 1} "
                              "for an embedding", param="input", code="context_length_exceeded")
    params = [SamplingParams(max_tokens=1, pooling=req.pooling)]

    async def respond():
        finals = await server.collect(request, server.run_prompts(prompts, params, new_id("embd"), req.priority))
        data = [{"object": "embedding", "index": i, "embedding": _encoded(finals[i].embedding, req.encoding_format)}
                for i in range(len(prompts))]
        num_prompt = sum(map(len, prompts))
        return {"object": "list", "data": data, "model": server.model_name,
                "usage": {"prompt_tokens": num_prompt, "total_tokens": num_prompt}}

    return await server.respond_admitted(len(prompts), respond)


def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# ---- /v1/chat/completions ------------------------------------------------------------------------
def _tool_settings(server: OpenAIServer, req: ChatCompletionRequest):
    """(tools, effective tool_choice, the parser class of the model's call format for "auto", or None)."""
    try:
        tools, tool_choice = req.tool_settings()
    except ValueError as exc:
        raise OpenAIError(str(exc), param="tool_choice") from exc
    parser = server.tool_parser if tool_choice == "auto" else None
    if tool_choice == "auto" and parser is None:
        raise OpenAIError("this model's chat template writes no tool calls that this server can read; use "
                          "tool_choice 'required' or a named function", param="tools", code="unsupported_parameter")
    return tools, tool_choice, parser


async def create_chat_completion(server: OpenAIServer, req: ChatCompletionRequest, request: Request):
    server.check_model(req.model)
    server.check_fields(req)
    tools, tool_choice, parser = _tool_settings(server, req)
    template_vars = {**(req.chat_template_kwargs or {}), **({"tools": tools} if tool_choice != "none" else {})}
    try:
        for i, message in enumerate(req.messages):
            message.check(i)
        prompt_ids = server.tokenizer.encode_chat([m.as_template_input() for m in req.messages],
                                                  req.add_generation_prompt, template_vars)
    except ValueError as exc:
        raise OpenAIError(str(exc), param="messages") from exc
    max_tokens = server.check_lengths(len(prompt_ids), req.max_completion_tokens or req.max_tokens)
    top = (req.top_logprobs or 0) if req.logprobs else None
    parallel = req.parallel_tool_calls is not False
    forced = forced_constraint(tools, tool_choice, parallel) if tools else None
    params = server.sampling_params(req, max_tokens, top, forced=forced)
    if parser is not None:   # the call tags are special tokens in some vocabularies (Qwen2.5's <tool_call>)
        params = [dataclasses.replace(p, skip_special_tokens=False) for p in params]

    def deltas() -> ChatDeltas:
        names = [t["function"]["name"] for t in tools or []]
        return ChatDeltas(tool_choice if tools else None, parser(names) if parser else None, parallel)

    async def respond():
        rid, created = req.request_id or new_id("chatcmpl"), now()
        stream = server.run_prompts([prompt_ids], params, rid, req.priority)
        head = {"id": rid, "created": created, "model": server.model_name}
        if req.stream:
            return _sse_response(_chat_chunks(server, req, stream, {**head, "object": "chat.completion.chunk"},
                                              len(prompt_ids), deltas))
        finals = await server.collect(request, stream)
        choices = []
        for i, out in sorted(finals.items()):
            text = deltas()
            choice = chat_choice(i, out, server.logprobs.chat(out.token_ids, out.logprobs) if req.logprobs else None)
            choice["message"] = text.message(out.text)
            choice["finish_reason"] = text.finish_reason(out.finish_reason)
            choices.append(choice)
        num_completion = sum(len(o.token_ids) for o in finals.values())
        return {**head, "object": "chat.completion", "choices": choices,
                "usage": usage(len(prompt_ids), num_completion)}

    return await server.respond_admitted(req.n, respond)


async def _chat_chunks(server, req, stream, head, num_prompt, make_deltas) -> AsyncIterator[str]:
    extra = {"usage": None} if req.include_usage else {}
    texts: dict[int, ChatDeltas] = {}
    num_completion = 0

    def chunk(index, delta, logprobs=None, finish_reason=None, **more):
        return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish_reason, **more}], **extra})

    async for index, out in stream:
        if index not in texts:
            texts[index] = make_deltas()
            yield chunk(index, {"role": "assistant", "content": ""})
        text = texts[index]
        num_completion += len(out.new_token_ids)
        new_lps = (out.logprobs or [])[len(out.token_ids) - len(out.new_token_ids):]
        logprobs = server.logprobs.chat(out.new_token_ids, new_lps) if req.logprobs else None
        deltas = text.feed(out.new_text) + (text.finish() if out.finished else [])
        if logprobs and logprobs["content"] and not deltas:
            deltas = [{"content": ""}]
        for k, delta in enumerate(deltas):
            yield chunk(index, delta, logprobs if k == 0 else None)
        if out.finished:
            yield chunk(index, {}, finish_reason=text.finish_reason(out.finish_reason), stop_reason=out.stop_reason)
    if req.include_usage:
        yield sse({**head, "choices": [], "usage": usage(num_prompt, num_completion)})


class EventStream(StreamingResponse):
    """A server-sent-event response that releases its request's admission when it ends, however it ends."""

    admission: Admission | None = None

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.admission is not None:
                self.admission.release()


def _sse_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield chunk
        except OpenAIError as exc:
            yield sse(exc.body())
        except EngineDeadError as exc:
            yield sse(OpenAIError(str(exc), 503, "server_error").body())
        except EngineRequestError as exc:
            yield sse(OpenAIError(str(exc), exc.status, exc.kind).body())
        except Exception:  # headers are sent: report in-band, keep the traceback in the server log
            log.exception("error while streaming")
            yield sse(OpenAIError("internal server error", 500, "internal_error").body())
        yield sse("[DONE]")

    return EventStream(body(), media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- the app ---------------------------------------------------------------------------------------
def build_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """`engine`: an `LLMEngine` (run on a thread of this process) or a started `EngineClient`."""
    config = config or ServerConfig()
    if not isinstance(engine, EngineClient):
        engine = ThreadEngine(engine, stall_timeout=config.engine_stall_timeout)
    server = OpenAIServer(engine, engine.tokenizer, config)

    @asynccontextmanager
    async def lifespan(app):
        app.state.loop = asyncio.get_running_loop()
        await server.async_engine.start_async()
        yield
        server.async_engine.stop()

    app = FastAPI(title="effinfer", lifespan=lifespan)
    app.state.server = server
    _install_error_handlers(app)
    # the last added runs first: the key is checked before any of the body is read
    app.add_middleware(BodyLimitMiddleware, max_bytes=server.config.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_keys=server.config.api_keys)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await create_completion(server, req, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await create_chat_completion(server, req, request)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest, request: Request):
        return await create_embeddings(server, req, request)

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": now(),
                                            "owned_by": "effinfer", "max_model_len": server.max_model_len}]}

    @app.get("/health")
    async def health():
        problem = server.health()
        if problem is not None:
            return JSONResponse({"status": "unavailable", "reason": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of 'prompt' and 'messages'", param="prompt")
        if req.messages is not None:
            ids = server.encode([m.as_template_input() for m in req.messages])
        else:
            ids = server.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": server.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        if any(not 0 <= t < server.tokenizer.vocab_size for t in req.tokens):
            raise OpenAIError(f"token ids must be in [0, {server.tokenizer.vocab_size})", param="tokens")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return resources.files("effinfer.serving").joinpath("static/chat.html").read_text()

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OpenAIError)
    async def openai_error(_, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = "request body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"invalid request: {where}: {first.get('msg', 'invalid value')}"
        return JSONResponse(OpenAIError(message, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return JSONResponse(OpenAIError(str(exc.detail), exc.status_code).body(), status_code=exc.status_code)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_, exc: EngineDeadError):
        return JSONResponse(OpenAIError(str(exc), 503, "server_error").body(), status_code=503)

    @app.exception_handler(EngineRequestError)
    async def engine_request_error(_, exc: EngineRequestError):
        return JSONResponse(OpenAIError(str(exc), exc.status, exc.kind).body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def internal_error(_, exc: Exception):
        log.exception("internal error")
        return JSONResponse(OpenAIError("internal server error", 500, "internal_error").body(), status_code=500)


PUBLIC_PATHS = frozenset({"/health", "/metrics", "/"})
"""Routes open without a key: liveness, Prometheus metrics (for scrapers; they hold counts, no text) and the
chat page (a static file whose API calls carry the key the user types)."""


class AuthMiddleware:
    """401 for a missing or wrong bearer key on every route but `PUBLIC_PATHS`, before the body is read.
    Keys are compared in constant time (`hmac.compare_digest`), every key every time."""

    def __init__(self, app, api_keys: list[str]):
        self.app, self.keys = app, [key.encode() for key in api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.keys and scope["path"] not in PUBLIC_PATHS:
            if not self.authorized(dict(scope["headers"]).get(b"authorization", b"")):
                error = OpenAIError("invalid or missing API key", 401, "authentication_error", code="invalid_api_key",
                                    headers={"WWW-Authenticate": "Bearer"})
                return await _error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)

    def authorized(self, header: bytes) -> bool:
        token = header[7:] if header[:7].lower() == b"bearer " else b""
        matches = [hmac.compare_digest(token, key) for key in self.keys]
        return any(matches)


class BodyLimitMiddleware:
    """413 for a request body over the limit, by Content-Length or, for a chunked body, once the bytes read
    pass it. The body is read here in full (at most the limit) and handed on, so the handler never sees
    part of one. Plain ASGI (not `BaseHTTPMiddleware`, which hides client disconnects from the handlers)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _error_response(self._error())(scope, receive, send)
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":   # the client left: let the app see it
                replay = [message]
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                return await _error_response(self._error())(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replaying_receive():
            return replay.pop() if replay else await receive()

        await self.app(scope, replaying_receive, send)

    def _error(self) -> OpenAIError:
        return OpenAIError(f"request body exceeds {self.max_bytes} bytes", 413, code="request_too_large")


def _error_response(error: OpenAIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class DrainingServer:
    """uvicorn's server with a graceful stop: the first SIGTERM/SIGINT drains (`OpenAIServer.drain`), then
    uvicorn shuts down; a second signal stops at once. `exit_code` is 1 when the engine failed for good."""

    def __init__(self, app: FastAPI, config: ServerConfig, log_level: str = "info"):
        import uvicorn

        outer = self

        class _Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                outer.request_stop(sig, frame)

        self.app, self.config = app, config
        self.uvicorn = _Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                              timeout_graceful_shutdown=5))
        self.exit_code = 0
        self._draining = False
        self._base_exit = uvicorn.Server.handle_exit
        engine = app.state.server.async_engine
        if hasattr(engine, "on_fatal"):
            engine.on_fatal = self.fail

    def run(self) -> int:
        self.uvicorn.run()
        return self.exit_code

    def request_stop(self, sig=None, frame=None) -> None:
        """Safe from a signal handler or another thread."""
        loop = getattr(self.app.state, "loop", None)
        if self._draining or loop is None or loop.is_closed():
            self._base_exit(self.uvicorn, sig, frame)
            return
        self._draining = True
        log.warning("stopping: draining the requests in flight (up to %g s)", self.config.drain_timeout)
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit(sig)))

    async def _drain_then_exit(self, sig) -> None:
        await self.app.state.server.drain(self.config.drain_timeout)
        self._base_exit(self.uvicorn, sig, None)

    def fail(self) -> None:
        """The engine is gone for good (on_engine_failure=exit): stop now, non-zero."""
        log.error("the engine failed; stopping the server (on_engine_failure=exit)")
        self.exit_code = 1
        self.app.state.server.draining = True
        self.uvicorn.should_exit = True
