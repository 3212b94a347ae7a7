"""The engine core in a process of its own (vLLM v1's split), and what its clients share.

The core process builds the engine and runs its step loop and nothing else: it reads commands (add,
abort) from one ZeroMQ socket, steps while there is work, and sends each step's output deltas with the
engine's counters, in one message, on another; idle, it sends a heartbeat every second. Messages are
msgpack, typed by msgspec (no pickle crosses the boundary). The core exits by itself when the process
that started it is gone.

Two clients start and drive it: the server's `serving.engine_core.ProcessEngine` (asynchronous, on the
event loop, restarting a core that dies) and `CoreEngine` here, the blocking one behind
`LLM(model, engine_process=True)`. Both spawn it with `spawn_core` and wait for it with `wait_ready`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field

import msgspec
import zmq

from effinfer.output_processor import OutputProcessor
from effinfer.outputs import CoreOutput, EngineStats, RequestOutput
from effinfer.prompts import Prompt, check_prompt_length, encode_prompt
from effinfer.sampling_params import SamplingParams
from effinfer.utils import log_to_stderr, release_free_memory

log = logging.getLogger("effinfer.engine")

HEARTBEAT_SECONDS = 1.0
STEP_FAILED = "internal server error (an engine step failed; the server log has the details)"


@dataclass
class EngineInfo:
    """What the API side needs to know of the engine it talks to."""

    model: str
    max_model_len: int
    vocab_size: int
    spec_method: str | None = None
    exit_layers: list[int] = field(default_factory=list)
    summary: str = ""
    """One line: what runs (weights, kernel, compiled or not) and why; printed at start-up."""
    settings: dict[str, str] = field(default_factory=dict)
    """The resolved choices (quantization, compile, dtype, KV cache dtype): `effinfer:engine_info` in /metrics."""
    hidden_size: int = 0
    """The width of the model's hidden states: the length of its embeddings."""


# ---- messages ----------------------------------------------------------------------------------------
class AddRequest(msgspec.Struct, tag="add"):
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0


class Abort(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class RequestFailed(msgspec.Struct, tag="failed"):
    request_id: str
    message: str
    status: int


class StepReport(msgspec.Struct, tag="step"):
    outputs: list[CoreOutput]
    stats: EngineStats
    step_time: float


class Heartbeat(msgspec.Struct, tag="heartbeat"):
    stats: EngineStats


class Ready(msgspec.Struct, tag="ready"):
    info: EngineInfo


class StartFailed(msgspec.Struct, tag="start_failed"):
    message: str


ToCore = AddRequest | Abort | Shutdown
FromCore = StepReport | Heartbeat | RequestFailed | Ready | StartFailed


# ---- the core process ---------------------------------------------------------------------------------
def run_engine_core(config, to_core: str, from_core: str, parent_pid: int, serving: bool = True) -> None:
    """The core process's main: build the engine, report ready, then loop until told to stop."""
    # Ctrl-C and a supervisor's SIGTERM reach the whole process group: the API process drains and then
    # stops this one, so the core must not die under the requests it is finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log_to_stderr()
    context = zmq.Context()
    commands, results = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    commands.connect(to_core)
    results.connect(from_core)
    encoder = msgspec.msgpack.Encoder()
    try:
        from effinfer.build import build_engine   # here: the clients' processes need no model code

        engine = build_engine(config, serving=serving)
        release_free_memory()
    except Exception as exc:  # bad model file, impossible settings: one clear line to the API process
        results.send(encoder.encode(StartFailed(f"{type(exc).__name__}: {exc}")))
        results.close(linger=2000)
        sys.exit(1)
    engine.text_elsewhere()   # the clients detokenize
    results.send(encoder.encode(Ready(engine_info(engine))))
    EngineCoreLoop(engine, commands, results, parent_pid).run()
    engine.close()
    context.destroy(linger=1000)


class EngineCoreLoop:
    def __init__(self, engine, commands: zmq.Socket, results: zmq.Socket, parent_pid: int):
        self.engine, self.commands, self.results, self.parent_pid = engine, commands, results, parent_pid
        self.encoder, self.decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToCore)
        self.stopping = False

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.commands, zmq.POLLIN)
        last_report = time.monotonic()
        while not self.stopping and os.getppid() == self.parent_pid:   # else the API process is gone
            busy = self.engine.has_unfinished()
            if poller.poll(0 if busy else HEARTBEAT_SECONDS * 1000):
                self.drain_commands()
            if self.engine.has_unfinished():
                self.step()
                last_report = time.monotonic()
            elif time.monotonic() - last_report >= HEARTBEAT_SECONDS:
                if self.engine.runner.failure:    # e.g. a tensor-parallel worker died while idle: not live
                    log.error("the engine cannot run: %s", self.engine.runner.failure)
                    self.engine.close()
                    sys.exit(1)
                self.send(Heartbeat(self.engine.stats()))
                last_report = time.monotonic()

    def drain_commands(self) -> None:
        while True:
            try:
                message = self.decoder.decode(self.commands.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if isinstance(message, AddRequest):
                self.add(message)
            elif isinstance(message, Abort):
                for rid in message.request_ids:
                    self.engine.abort(rid)
            else:
                self.stopping = True

    def add(self, message: AddRequest) -> None:
        try:
            self.engine.add_request(message.prompt_ids, message.params, message.request_id, message.priority)
        except (ValueError, TypeError) as exc:
            self.send(RequestFailed(message.request_id, str(exc), 400))

    def step(self) -> None:
        started = time.perf_counter()
        outputs, failed = run_step(self.engine.core_step, self.engine)
        fatal = self.engine.runner.failure    # the engine can run no more steps: fail its requests, then exit
        for rid in failed:
            self.send(RequestFailed(rid, f"the engine failed: {fatal}" if fatal else STEP_FAILED, 500))
        if fatal:
            self.engine.close()
            self.results.close(linger=2000)    # the failures reach the clients before the process ends
            sys.exit(1)
        if not failed:
            self.send(StepReport(outputs, self.engine.stats(), time.perf_counter() - started))

    def send(self, message) -> None:
        self.results.send(self.encoder.encode(message))



def run_step(step, engine) -> tuple[list, list[str]]:
    """(outputs, []) of one engine step (`step`: `engine.step` or `engine.core_step`); if it raises, ([], the ids
    of every request in the engine), each aborted (its blocks freed): a failed step ends the requests in it, not
    the loop that runs it."""
    held = list(engine.requests)     # before the step: a dead runner makes the engine end them itself
    try:
        return step(), []
    except Exception:
        log.exception("engine step failed; failing the requests in it")
        failed = list(dict.fromkeys(held + list(engine.requests)))
        for rid in failed:
            engine.abort(rid)
        return [], failed


def _compile_setting(engine) -> str:
    if engine.background_compile is not None:
        return "background"
    return "ahead" if engine.runner.compiled_forward is not None else "off"


def engine_info(engine) -> EngineInfo:
    early_exit, config = engine.early_exit, engine.config
    settings = {"quantization": config.quant.quantization or "none", "compile": _compile_setting(engine),
                "dtype": config.model.dtype, "kv_cache_dtype": config.cache.kv_cache_dtype,
                "speculative_method": config.spec.speculative_method or "none"}
    return EngineInfo(config.model.model, engine.max_model_len, engine.loaded.config.vocab_size,
                      config.spec.speculative_method, list(early_exit.heads.layers) if early_exit else [],
                      engine.summary, settings, engine.loaded.config.hidden_size)


# ---- starting and stopping a core (both clients) ------------------------------------------------------
@dataclass
class CoreHandle:
    """A started core process and this side's two sockets to it (commands PUSH, results PULL; this side binds)."""

    process: multiprocessing.Process
    commands: zmq.Socket
    results: zmq.Socket


def spawn_core(config, context: zmq.Context, address: str, results: zmq.Socket, serving: bool) -> CoreHandle:
    """Start a core process for `config`; `results`: this side's PULL socket (a plain or an asyncio one), bound
    here. `address`: a path prefix for the two IPC sockets. The core loads the model meanwhile."""
    to_core, from_core = f"ipc://{address}-in", f"ipc://{address}-out"
    commands = context.socket(zmq.PUSH)
    commands.bind(to_core)
    results.bind(from_core)
    spawn = multiprocessing.get_context("spawn")   # fork would copy this process's threads and torch state
    process = spawn.Process(target=run_engine_core, args=(config, to_core, from_core, os.getpid(), serving),
                            name="effinfer-engine-core", daemon=True)
    process.start()
    return CoreHandle(process, commands, results)


def wait_ready(core: CoreHandle, timeout: float) -> Ready:
    """Block until the core has built its engine; a core that cannot start raises with its reason."""
    decoder = msgspec.msgpack.Decoder(FromCore)
    results = zmq.Socket.shadow(core.results.underlying)    # plain and non-owning, whatever kind `results` is
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if results.poll(200):
            message = decoder.decode(results.recv())
            if isinstance(message, Ready):
                return message
            if isinstance(message, StartFailed):
                core.process.join(5)
                raise RuntimeError(f"the engine could not start: {message.message}")
        elif not core.process.is_alive():
            raise RuntimeError(f"the engine process exited while starting (exit code {core.process.exitcode}; it is "
                               "spawned, so a script that starts it needs an `if __name__ == '__main__':` guard)")
    core.process.kill()
    raise RuntimeError(f"the engine did not start within {timeout:.0f} s")


def stop_core(core: CoreHandle, timeout: float) -> None:
    """Ask the core to stop, kill it if it has not within `timeout`, and close this side's sockets."""
    if core.process.is_alive():
        try:
            core.commands.send(msgspec.msgpack.encode(Shutdown()), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        core.process.join(timeout)
        if core.process.is_alive():
            core.process.kill()
            core.process.join(5)
    close_sockets(core)


def close_sockets(core: CoreHandle) -> None:
    # An asyncio socket is not among its context's own (`destroy` would wait on it forever): close both here.
    for socket in (core.commands, core.results):
        if not socket.closed:
            socket.close(linger=0)


# ---- the blocking client: LLM(model, engine_process=True) ------------------------------------------------
class CoreEngine:
    """An engine core process behind the calls `LLM` makes of an in-process `LLMEngine` (`encode_prompt`,
    `check_prompt_length`, `add_request`, `step`, `abort`, `has_unfinished`): this process keeps the tokenizer,
    each `step()` returns the outputs of the core's next step report. One caller at a time."""

    def __init__(self, config, start_timeout: float = 900.0, step_timeout: float = 600.0):
        from effinfer.loader.source import load_tokenizer

        self.config, self.step_timeout = config, step_timeout
        self._dir = tempfile.mkdtemp(prefix="effinfer-ipc-")
        self._context = zmq.Context()
        self._core: CoreHandle | None = None
        atexit.register(self.close)   # multiprocessing's own handler would wait on a core that ignores SIGTERM
        try:
            self._core = spawn_core(config, self._context, f"{self._dir}/core", self._context.socket(zmq.PULL),
                                    serving=False)
            self.tokenizer = load_tokenizer(config.model.model, config.model.cache_dir)   # while the core loads
            self.info = wait_ready(self._core, start_timeout).info
        except BaseException:
            self.close()
            raise
        self.max_model_len = self.info.max_model_len
        self._encoder, self._decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
        self._outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @property
    def summary(self) -> str:
        return self.info.summary

    @property
    def pid(self) -> int:
        return self._core.process.pid

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, self.info.vocab_size, prompt)

    def check_prompt_length(self, prompt_ids: list[int]) -> None:
        check_prompt_length(prompt_ids, self.max_model_len)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0) -> str:
        params = params or SamplingParams()
        prompt_ids = self.encode_prompt(prompt)
        self.check_prompt_length(prompt_ids)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._outputs.states:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._send(AddRequest(request_id, prompt_ids, params, priority))
        self._outputs.add(request_id, prompt_ids, params)
        return request_id

    def abort(self, request_id: str) -> None:
        if self._outputs.abort(request_id) and self._core.process.is_alive():
            self._send(Abort([request_id]))

    def _send(self, message) -> None:
        """Without blocking: a send to a core that has died would wait forever for it to come back."""
        try:
            if not self._core.process.is_alive():
                raise zmq.Again()
            self._core.commands.send(self._encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            raise RuntimeError(f"the engine process has died (exit code {self._core.process.exitcode})") from None

    def _send_quietly(self, message) -> None:
        """A core that cannot take it has died: the next `step()` says so; the outputs in hand are complete."""
        try:
            self._send(message)
        except RuntimeError:
            pass

    def has_unfinished(self) -> bool:
        return self._outputs.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """The outputs of the core's next step (blocking); a request the core refused raises its error."""
        deadline = time.monotonic() + self.step_timeout
        while time.monotonic() < deadline:
            if not self._core.results.poll(200):
                if not self._core.process.is_alive():
                    self._outputs.clear()
                    raise RuntimeError(f"the engine process died (exit code {self._core.process.exitcode})")
                continue
            message = self._decoder.decode(self._core.results.recv())
            if isinstance(message, StepReport):
                outputs, stopped = self._outputs.process(message.outputs)
                if stopped:   # ended here by a stop string: free their blocks in the core
                    self._send_quietly(Abort(stopped))
                return outputs
            if isinstance(message, RequestFailed) and self._outputs.abort(message.request_id):
                if message.status < 500:
                    raise ValueError(message.message)
                self._outputs.clear()    # a failed step: the core has aborted every request it held
                raise RuntimeError("an engine step failed; the engine process's stderr has the traceback"
                                   if message.message == STEP_FAILED else message.message)
            if not self._outputs.has_unfinished():   # a heartbeat, or the report of requests aborted here
                return []
        raise RuntimeError(f"the engine made no progress for {self.step_timeout:.0f} s")

    def close(self) -> None:
        if self._context.closed:
            return
        atexit.unregister(self.close)
        if self._core is not None:
            stop_core(self._core, 10.0)
        self._context.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)
