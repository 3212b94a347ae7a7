"""The engine core in its own process (vLLM v1's split), and the API process's client of it.

The core process builds the engine and runs its step loop and nothing else: it reads commands (add,
abort) from one ZeroMQ socket, steps while there is work, and sends each step's output deltas with the
engine's counters, in one message, on another; idle, it sends a heartbeat every second. The API process
(`ProcessEngine`) does HTTP, validation, templates, tokenization and streaming; it sends commands without
blocking and receives on its event loop. Messages are msgpack, typed by msgspec (no pickle crosses the
boundary).

If the core process dies, every request in flight ends at once with an error (`EngineDeadError`) and the
server restarts the core or exits, by its `on_engine_failure` setting. The core exits by itself when the
API process is gone.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Callable

import msgspec
import zmq
import zmq.asyncio

from effinfer.decoding.sampler import TokenLogprobs
from effinfer.outputs import EngineStats, RequestMetrics, RequestOutput
from effinfer.sampling_params import SamplingParams
from effinfer.serving.async_engine import (STEP_FAILED, EngineClient, EngineDeadError, EngineInfo, EngineRequestError,
                                           OnStep, check_failure_policy, engine_info, run_step)
from effinfer.utils import log_to_stderr

log = logging.getLogger("effinfer.serving")

HEARTBEAT_SECONDS = 1.0


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


class OutputDelta(msgspec.Struct):
    """What one step added to one request: the API side accumulates these into `RequestOutput`s."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprobs] | None = None
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class RequestFailed(msgspec.Struct, tag="failed"):
    request_id: str
    message: str
    status: int


class StepReport(msgspec.Struct, tag="step"):
    outputs: list[OutputDelta]
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
def run_engine_core(config, to_core: str, from_core: str, parent_pid: int) -> None:
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
        from effinfer.llm import build_engine

        engine = build_engine(config, serving=True)
    except Exception as exc:  # bad model file, impossible settings: one clear line to the API process
        results.send(encoder.encode(StartFailed(f"{type(exc).__name__}: {exc}")))
        results.close(linger=2000)
        sys.exit(1)
    results.send(encoder.encode(Ready(engine_info(engine))))
    EngineCoreLoop(engine, commands, results, parent_pid).run()
    context.destroy(linger=1000)


class EngineCoreLoop:
    def __init__(self, engine, commands: zmq.Socket, results: zmq.Socket, parent_pid: int):
        self.engine, self.commands, self.results, self.parent_pid = engine, commands, results, parent_pid
        self.encoder, self.decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToCore)
        self.sent_logprobs: dict[str, int] = {}
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
                    self.forget(rid)
            else:
                self.stopping = True

    def add(self, message: AddRequest) -> None:
        try:
            self.engine.add_request(message.prompt_ids, message.params, message.request_id, message.priority)
        except (ValueError, TypeError) as exc:
            self.send(RequestFailed(message.request_id, str(exc), 400))
            return
        self.sent_logprobs[message.request_id] = 0

    def step(self) -> None:
        started = time.perf_counter()
        outputs, failed = run_step(self.engine)
        for rid in failed:
            self.forget(rid)
            self.send(RequestFailed(rid, STEP_FAILED, 500))
        if failed:
            return
        deltas = [self.delta(out) for out in outputs]
        self.send(StepReport(deltas, self.engine.stats(), time.perf_counter() - started))

    def delta(self, out: RequestOutput) -> OutputDelta:
        rid = out.request_id
        logprobs = None
        if out.logprobs is not None:
            logprobs = out.logprobs[self.sent_logprobs.get(rid, 0):]
            self.sent_logprobs[rid] = len(out.logprobs)
        if out.finished:
            self.forget(rid)
        return OutputDelta(rid, out.new_token_ids, out.new_text, logprobs, out.finished, out.finish_reason,
                           out.stop_reason, out.metrics if out.finished else None,
                           out.prompt_logprobs if out.finished else None)

    def forget(self, rid: str) -> None:
        self.sent_logprobs.pop(rid, None)

    def send(self, message) -> None:
        self.results.send(self.encoder.encode(message))


# ---- the API process's side ---------------------------------------------------------------------------
class _Accumulated:
    """A request's output so far, rebuilt from deltas."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams):
        self.prompt_ids, self.params = prompt_ids, params
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[TokenLogprobs] = []

    def apply(self, rid: str, d: OutputDelta) -> RequestOutput:
        self.token_ids += d.new_token_ids
        self.text += d.new_text
        if d.new_logprobs:
            self.logprobs += d.new_logprobs
        return RequestOutput(rid, self.prompt_ids, list(self.token_ids), self.text, d.new_token_ids, d.new_text,
                             list(self.logprobs) if self.params.logprobs is not None else None, d.finished,
                             d.finish_reason, d.stop_reason, d.metrics, d.prompt_logprobs)


class ProcessEngine(EngineClient):
    """Starts the engine core process and talks to it; restarts it when it dies (`on_failure="restart"`) or
    calls `on_fatal` (`"exit"`: the server stops with a non-zero status)."""

    def __init__(self, config, on_step: OnStep | None = None, stall_timeout: float = 60.0,
                 on_failure: str = "restart", start_timeout: float = 900.0):
        check_failure_policy(on_failure)
        super().__init__(EngineInfo(config.model.model, 0, 0), on_step, stall_timeout)
        self.config, self.on_failure, self.start_timeout = config, on_failure, start_timeout
        self.on_fatal: Callable[[], None] | None = None
        self._context = zmq.Context()
        self._encoder, self._decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(FromCore)
        self._outputs: dict[str, _Accumulated] = {}
        self._process: multiprocessing.Process | None = None
        self._state = "starting"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._receiver: asyncio.Task | None = None
        self._dir = tempfile.mkdtemp(prefix="effinfer-ipc-")
        self._generation = 0
        self.num_restarts = 0
        # multiprocessing's own exit handler would SIGTERM the core (which ignores it) and wait on it forever
        atexit.register(self.stop)

    # ---- starting and stopping ------------------------------------------------------------------------
    def start(self) -> None:
        """Spawn the core and wait (blocking) until it has built the engine; raises if it cannot."""
        self.spawn()
        self.wait_ready()

    def spawn(self) -> None:
        """Start the core process (it loads the model meanwhile: load the tokenizer here in the while)."""
        self._generation += 1
        to_core, from_core = (f"ipc://{self._dir}/{name}-{self._generation}" for name in ("in", "out"))
        self._commands = self._context.socket(zmq.PUSH)
        self._commands.bind(to_core)
        # The receiving socket is asyncio's (it owns the socket and so unregisters its fd from the event loop
        # when closed); the wait for Ready reads it through a plain, non-owning shadow.
        self._results = zmq.asyncio.Socket(self._context, zmq.PULL)
        self._results.bind(from_core)
        spawn = multiprocessing.get_context("spawn")   # fork would copy this process's threads and torch state
        self._process = spawn.Process(target=run_engine_core, args=(self.config, to_core, from_core, os.getpid()),
                                      name="effinfer-engine-core", daemon=True)
        self._process.start()

    def wait_ready(self) -> None:
        message = self._wait_ready()
        self.info = message.info
        self.last_progress = time.monotonic()
        self._state = "running"

    def _wait_ready(self) -> Ready:
        deadline = time.monotonic() + self.start_timeout
        results = zmq.Socket.shadow(self._results.underlying)
        while time.monotonic() < deadline:
            if results.poll(200):
                message = self._decoder.decode(results.recv())
                if isinstance(message, Ready):
                    return message
                if isinstance(message, StartFailed):
                    self._process.join(5)
                    raise RuntimeError(f"the engine could not start: {message.message}")
            elif not self._process.is_alive():
                raise RuntimeError(f"the engine process exited while starting (exit code {self._process.exitcode})")
        self._process.kill()
        raise RuntimeError(f"the engine did not start within {self.start_timeout:.0f} s")

    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch()

    def _watch(self) -> None:
        """Receive on the event loop, and learn of the core's death the moment it happens (its sentinel)."""
        self._receiver = self._loop.create_task(self._receive(self._results))
        process = self._process
        self._loop.add_reader(process.sentinel, self._on_exit, process)

    def stop(self, timeout: float = 10.0) -> None:
        if self._state == "stopped":
            return
        self._state = "stopped"
        if self._loop is not None and not self._loop.is_closed() and self._process is not None:
            self._loop.remove_reader(self._process.sentinel)
        if self._receiver is not None:
            self._receiver.cancel()
        self.fail_all(EngineDeadError("the server is shutting down"))
        if self._process is not None and self._process.is_alive():
            try:
                self._commands.send(self._encoder.encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(5)
        self._close_sockets()
        self._context.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _close_sockets(self) -> None:
        # The asyncio socket is not among the context's own (`destroy` would wait on it forever): close it here.
        for socket in (getattr(self, "_commands", None), getattr(self, "_results", None)):
            if socket is not None and not socket.closed:
                socket.close(linger=0)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def dead_reason(self) -> str | None:
        return {"running": None, "starting": "the engine is starting", "restarting": "the engine is restarting after a failure",
                "dead": "the engine process has died", "stopped": "the server is shutting down"}[self._state]

    # ---- commands out, results in ----------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        if command[0] == "add":
            _, rid, prompt_ids, params, priority = command
            self._outputs[rid] = _Accumulated(prompt_ids, params)
            message = AddRequest(rid, prompt_ids, params, priority)
        else:
            self._outputs.pop(command[1], None)
            message = Abort([command[1]])
        self._commands.send(self._encoder.encode(message))   # PUSH queues locally: does not block the loop

    async def _receive(self, results: zmq.asyncio.Socket) -> None:
        while True:
            message = self._decoder.decode(await results.recv())
            try:
                self._handle(message)
            except Exception:   # one bad message must not stop the deliveries of all the others
                log.exception("could not handle the engine's %s message", type(message).__name__)

    def _handle(self, message) -> None:
        if isinstance(message, StepReport):
            outputs = [self._apply(d) for d in message.outputs]
            self.report_progress(message.stats, [o for o in outputs if o is not None], message.step_time)
        elif isinstance(message, Heartbeat):
            self.report_progress(message.stats, [], None)
        elif isinstance(message, RequestFailed):
            self._outputs.pop(message.request_id, None)
            self.deliver(message.request_id, EngineRequestError(message.message, message.status))

    def _apply(self, delta: OutputDelta) -> RequestOutput | None:
        acc = self._outputs.get(delta.request_id)
        if acc is None:   # aborted here while the step ran
            return None
        out = acc.apply(delta.request_id, delta)
        if delta.finished:
            del self._outputs[delta.request_id]
        self.deliver(delta.request_id, out)
        return out

    # ---- failure ---------------------------------------------------------------------------------------
    def _on_exit(self, process: multiprocessing.Process) -> None:
        self._loop.remove_reader(process.sentinel)
        if self._state == "stopped":
            return
        process.join(1)
        log.error("the engine process exited (code %s); failing %d requests in flight", process.exitcode,
                  len(self._streams))
        self._state = "restarting" if self.on_failure == "restart" else "dead"
        self._receiver.cancel()
        self._outputs.clear()
        self.fail_all(EngineDeadError(f"the engine process died (exit code {process.exitcode}); "
                                      "the request was not completed"))
        self._close_sockets()
        if self.on_failure == "restart":
            self._loop.create_task(self._restart())
        elif self.on_fatal is not None:
            self.on_fatal()

    async def _restart(self) -> None:
        log.warning("restarting the engine process")
        try:
            await self._loop.run_in_executor(None, self.start)
        except Exception as exc:
            log.error("the engine could not restart: %s", exc)
            self._state = "dead"
            if self.on_fatal is not None:
                self.on_fatal()
            return
        self.num_restarts += 1
        self._watch()
        log.warning("the engine process is back (pid %s)", self._process.pid)
