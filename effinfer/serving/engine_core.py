"""The API process's client of the engine core process (`effinfer.core_process`, vLLM v1's split).

The API process (`ProcessEngine`) does HTTP, validation, templates, tokenization and streaming; the core
runs the scheduler and the model. Commands are sent without blocking, results received on the event loop.
If the core process dies, every request in flight ends at once with an error (`EngineDeadError`) and the
server restarts the core or exits, by its `on_engine_failure` setting.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing
import shutil
import tempfile
import time
from typing import Callable

import msgspec
import zmq
import zmq.asyncio

from effinfer.core_process import (Abort, AddRequest, CoreHandle, EngineInfo, FromCore, Heartbeat, RequestFailed,
                                   StepReport, close_sockets, spawn_core, stop_core, wait_ready)
from effinfer.output_processor import OutputProcessor
from effinfer.serving.async_engine import (EngineClient, EngineDeadError, EngineRequestError, OnStep,
                                           check_failure_policy)

log = logging.getLogger("effinfer.serving")


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
        self._outputs: OutputProcessor | None = None
        """Text from the core's token ids: detokenization and stop strings run here, not in the core."""
        self._core: CoreHandle | None = None
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
        """Spawn the core and wait (blocking) until it has built the engine; raises if it cannot. The tokenizer
        loads here while the core loads the model (once: a restarted core reuses it)."""
        self.spawn()
        if self.tokenizer is None:
            self._load_tokenizer()
        self.wait_ready()

    def _load_tokenizer(self) -> None:
        from effinfer.loader.source import load_tokenizer

        try:
            self.tokenizer = load_tokenizer(self.config.model.model, self.config.model.cache_dir)
        except Exception as exc:
            try:
                self.wait_ready()   # the core read the same file: its reason, if it has one, is the one to give
            finally:
                self.stop()
            raise RuntimeError(f"the model's tokenizer could not load: {exc}") from exc
        self._outputs = OutputProcessor(self.tokenizer)

    def spawn(self) -> None:
        """Start the core process; it loads the model meanwhile."""
        self._generation += 1
        # The receiving socket is asyncio's (it owns the socket and so unregisters its fd from the event loop
        # when closed); the wait for Ready reads it through a plain, non-owning shadow.
        self._core = spawn_core(self.config, self._context, f"{self._dir}/core-{self._generation}",
                                zmq.asyncio.Socket(self._context, zmq.PULL), serving=True)

    def wait_ready(self) -> None:
        self.info = wait_ready(self._core, self.start_timeout).info
        self.last_progress = time.monotonic()
        self._state = "running"

    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._watch()

    def _watch(self) -> None:
        """Receive on the event loop, and learn of the core's death the moment it happens (its sentinel)."""
        self._receiver = self._loop.create_task(self._receive(self._core.results))
        process = self._core.process
        self._loop.add_reader(process.sentinel, self._on_exit, process)

    def stop(self, timeout: float = 10.0) -> None:
        if self._state == "stopped":
            return
        self._state = "stopped"
        if self._loop is not None and not self._loop.is_closed() and self._core is not None:
            self._loop.remove_reader(self._core.process.sentinel)
        if self._receiver is not None:
            self._receiver.cancel()
        self.fail_all(EngineDeadError("the server is shutting down"))
        if self._core is not None:
            stop_core(self._core, timeout)
        self._context.destroy(linger=0)
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self._core.process.pid if self._core is not None else None

    def dead_reason(self) -> str | None:
        return {"running": None, "starting": "the engine is starting", "restarting": "the engine is restarting after a failure",
                "dead": "the engine process has died", "stopped": "the server is shutting down"}[self._state]

    # ---- commands out, results in ----------------------------------------------------------------------
    def _submit(self, command: tuple) -> None:
        if command[0] == "add":
            _, rid, prompt_ids, params, priority = command
            self._outputs.add(rid, prompt_ids, params)
            message = AddRequest(rid, prompt_ids, params, priority)
        else:
            self._outputs.abort(command[1])
            message = Abort([command[1]])
        try:   # never blocks the event loop: a core that died and is not yet reaped takes no more messages
            self._core.commands.send(self._encoder.encode(message), zmq.NOBLOCK)
        except zmq.Again:
            if command[0] == "add":
                self._outputs.abort(command[1])
                raise EngineDeadError("the engine process is not taking requests (it died or is restarting)") from None

    async def _receive(self, results: zmq.asyncio.Socket) -> None:
        while True:
            message = self._decoder.decode(await results.recv())
            try:
                self._handle(message)
            except Exception:   # one bad message must not stop the deliveries of all the others
                log.exception("could not handle the engine's %s message", type(message).__name__)

    def _handle(self, message) -> None:
        if isinstance(message, StepReport):
            outputs, stopped = self._outputs.process(message.outputs)
            for out in outputs:
                self.deliver(out.request_id, out)
            if stopped:   # ended here by a stop string: free their blocks in the core
                self._send_quietly(Abort(stopped))
            self.report_progress(message.stats, outputs, message.step_time)
        elif isinstance(message, Heartbeat):
            self.report_progress(message.stats, [], None)
        elif isinstance(message, RequestFailed):
            self._outputs.abort(message.request_id)
            self.deliver(message.request_id, EngineRequestError(message.message, message.status))

    def _send_quietly(self, message) -> None:
        """A core that cannot take it has died: its death ends every request anyway."""
        try:
            self._core.commands.send(self._encoder.encode(message), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

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
        close_sockets(self._core)
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
        log.warning("the engine process is back (pid %s)", self.pid)
