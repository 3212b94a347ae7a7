"""The server's view of an engine: requests in, per-request asyncio streams out, and the engine's health.

`EngineClient` holds what both ways of running the engine share: a stream per request, aborts when a
consumer stops listening (client disconnect), failing every stream with a clear error when the engine
dies or the server stops, and liveness (the engine reports progress; no report for `stall_timeout`
seconds turns `/health` to 503 and logs the requests in flight). Two subclasses run the engine:

- `ThreadEngine`: the engine's step loop on a thread of this process (tests, `LLM`-built engines);
- `serving.engine_core.ProcessEngine`: the engine in its own process over ZeroMQ (what `effinfer serve` runs),
  so that a step never holds this process's GIL while HTTP, tokenization and streaming run.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from effinfer.core_process import STEP_FAILED, EngineInfo, engine_info, run_step
from effinfer.outputs import EngineStats, RequestOutput
from effinfer.sampling_params import SamplingParams

log = logging.getLogger("effinfer.serving")

ON_ENGINE_FAILURE = ("restart", "exit")
"""What the server does when its engine process dies: start a new one, or stop (non-zero) for a supervisor."""
OnStep = Callable[[EngineStats, list[RequestOutput], float | None], None]


class EngineDeadError(RuntimeError):
    """The engine cannot run the request: it died, is restarting, or the server is shutting down (503)."""


class EngineRequestError(RuntimeError):
    """The engine refused or failed one request; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status

    @property
    def kind(self) -> str:
        """OpenAI's error type for it."""
        return "server_error" if self.status >= 500 else "invalid_request_error"


def check_failure_policy(policy: str) -> None:
    if policy not in ON_ENGINE_FAILURE:
        raise ValueError(f"on_engine_failure={policy!r} is not supported; choose {' or '.join(ON_ENGINE_FAILURE)}")


@dataclass
class _Stream:
    queue: asyncio.Queue
    index: int


class EngineClient:
    """Requests and streams; subclasses say how a command reaches the engine (`_submit`)."""

    def __init__(self, info: EngineInfo, on_step: OnStep | None = None, stall_timeout: float = 60.0):
        self.info, self.on_step, self.stall_timeout = info, on_step, stall_timeout
        self.tokenizer = None
        """The model's tokenizer, in this process (set by the subclass)."""
        self._streams: dict[str, _Stream] = {}
        self.num_in_flight = 0
        """Sequences added and not yet finished, kept by the handlers' side."""
        self.last_progress = time.monotonic()
        self.stats = EngineStats()
        self._stall_logged = False

    # ---- the subclass's part -------------------------------------------------------------------------
    async def start_async(self) -> None:
        """Called on the server's event loop once it runs."""

    def stop(self, timeout: float = 10.0) -> None:
        raise NotImplementedError

    def _submit(self, command: tuple) -> None:
        """("add", rid, prompt_ids, params, priority) or ("abort", rid)."""
        raise NotImplementedError

    def dead_reason(self) -> str | None:
        """Why the engine cannot take requests now, or None."""
        raise NotImplementedError

    # ---- requests ------------------------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: list[SamplingParams], request_id: str,
                       priority: int = 0) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run the n samples of one prompt; yields (sample index, output delta) until all finish."""
        reason = self.dead_reason()
        if reason is not None:
            raise EngineDeadError(reason)
        out_queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{request_id}-{k}" for k in range(len(params))]
        try:
            for k, (rid, p) in enumerate(zip(ids, params)):
                self._streams[rid] = _Stream(out_queue, k)
                self._submit(("add", rid, prompt_ids, p, priority))
        except BaseException:   # the engine took none or some: forget them all, abort what it took
            for rid in ids:
                if self._streams.pop(rid, None) is not None:
                    self._submit(("abort", rid))
            raise
        self.num_in_flight += len(ids)
        unfinished = set(ids)
        try:
            while unfinished:
                index, item = await out_queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    unfinished.discard(item.request_id)
                yield index, item
        finally:
            for rid in unfinished:  # the consumer left early (disconnect, error): free the blocks now
                if rid in self._streams:
                    self._submit(("abort", rid))
            for rid in ids:
                self._streams.pop(rid, None)
            self.num_in_flight -= len(ids)

    def deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        """On the event loop: hand an output (or the error that ends the request) to its stream."""
        stream = self._streams.get(rid)
        if stream is None:
            return
        if isinstance(item, BaseException):
            self._streams.pop(rid)   # ended: no abort needed when the consumer leaves
        stream.queue.put_nowait((stream.index, item))

    def fail_all(self, error: BaseException) -> None:
        """End every stream with `error` (engine died, server stopping): no handler waits forever."""
        for rid in list(self._streams):
            self.deliver(rid, error)

    def report_progress(self, stats: EngineStats, outputs: list[RequestOutput], step_time: float | None) -> None:
        """After a step, or from an idle engine (`step_time` None): it is alive, and its counters now."""
        self.last_progress = time.monotonic()
        self._stall_logged = False
        self.stats = stats
        if self.on_step is not None:
            self.on_step(stats, outputs, step_time)

    # ---- health --------------------------------------------------------------------------------------
    def health(self) -> str | None:
        """None when the engine is alive and making progress; otherwise why not (and `/health` says 503)."""
        reason = self.dead_reason()
        if reason is not None:
            return reason
        silent = time.monotonic() - self.last_progress
        if silent > self.stall_timeout:
            if not self._stall_logged:
                self._stall_logged = True
                log.error("the engine has made no progress for %.0f s; requests in flight: %s", silent,
                          ", ".join(sorted(self._streams)) or "none")
            return f"the engine has made no progress for {silent:.0f} s"
        return None


class ThreadEngine(EngineClient):
    """The engine's step loop on a thread of this process.

    The engine is not thread-safe and a step is blocking CPU work, so it lives on one thread: handlers put
    commands in an inbox; the loop drains it, runs `step()` while there is work (sleeps otherwise) and hands
    each output to its stream on the event loop. An exception in a step fails the requests of that step with
    a 500, and the loop goes on."""

    def __init__(self, engine, on_step: OnStep | None = None, stall_timeout: float = 60.0):
        super().__init__(engine_info(engine), on_step, stall_timeout)
        self.engine, self.tokenizer = engine, engine.tokenizer
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="effinfer-engine", daemon=True)

    async def start_async(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and end the loop."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def dead_reason(self) -> str | None:
        if self._stopping:
            return "the server is shutting down"
        if self.engine.runner.failure:     # e.g. a tensor-parallel worker died: no step can run again
            return f"the engine failed: {self.engine.runner.failure}"
        return None if self._thread.is_alive() else "the engine loop is not running"

    def _submit(self, command: tuple) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._call(self.report_progress, self.engine.stats(), [], None)   # idle: counters change too (a compile)
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._step()
        self._abort_all()

    def _call(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:   # the event loop has closed: nobody is listening any more
            pass

    def _inbox_items(self):
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for command, rid, *args in self._inbox_items():
            if command == "abort":
                self.engine.abort(rid)
                continue
            prompt_ids, params, priority = args
            try:
                self.engine.add_request(prompt_ids, params, rid, priority)
            except (ValueError, TypeError) as exc:   # validated by the handler already; what is left is the client's
                self._call(self.deliver, rid, EngineRequestError(str(exc), 400))

    def _step(self) -> None:
        started = time.perf_counter()
        outputs, failed = run_step(self.engine.step, self.engine)
        fatal = self.engine.runner.failure
        for rid in failed:
            self._call(self.deliver, rid, EngineRequestError(f"the engine failed: {fatal}" if fatal else STEP_FAILED))
        for out in outputs:
            self._call(self.deliver, out.request_id, out)
        self._call(self.report_progress, self.engine.stats(), outputs, time.perf_counter() - started)

    def _abort_all(self) -> None:
        """Shutdown: free what is queued or running; the streams end with an error."""
        for _ in self._inbox_items():
            pass
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        self._call(self.fail_all, EngineDeadError("the server is shutting down"))


