"""One engine step loop on its own thread, feeding per-request asyncio queues.

The engine is not thread-safe and a step is blocking CPU work, so it lives on one thread: HTTP
handlers put commands (add, abort) in an inbox and await their request's queue; the loop drains the
inbox, runs `step()` while there is work (sleeps otherwise) and hands each output to its queue on the
event loop with `call_soon_threadsafe`. A handler that stops listening (client disconnect) aborts its
requests, which frees their KV blocks at the next turn of the loop. An exception in a step fails the
requests of that step with a 500, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from effinfer.engine.llm_engine import LLMEngine
from effinfer.outputs import RequestOutput
from effinfer.sampling_params import SamplingParams

log = logging.getLogger("effinfer.serving")


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[LLMEngine, list[RequestOutput], float], None] | None = None):
        self.engine = engine
        self.on_step = on_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="effinfer-engine", daemon=True)
        self.num_in_flight = 0
        """Requests added and not yet finished (waiting + running), kept by the handlers' side."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything in flight and end the loop."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def generate(self, prompt_ids: list[int], params: list[SamplingParams], request_id: str,
                       priority: int = 0) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Run the n samples of one prompt; yields (sample index, output delta) until all finish."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        loop, out_queue = asyncio.get_running_loop(), asyncio.Queue()
        ids = [f"{request_id}-{k}" for k in range(len(params))]
        for k, (rid, p) in enumerate(zip(ids, params)):
            self._streams[rid] = _Stream(loop, out_queue, k)
            self._inbox.put(("add", rid, prompt_ids, p, priority))
        self.num_in_flight += len(ids)
        self._wake.set()
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
                self._inbox.put(("abort", rid))
            for rid in ids:
                self._streams.pop(rid, None)
            self.num_in_flight -= len(ids)
            self._wake.set()

    # ---- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._step()
        self._abort_all()

    def _inbox_items(self):
        """The commands queued so far, without waiting for more."""
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
            try:
                prompt_ids, params, priority = args
                self.engine.add_request(prompt_ids, params, rid, priority)
            except Exception as exc:  # validated by the handler already; anything left is reported, not fatal
                self._deliver(rid, exc)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed; failing the requests in it")
            for rid in list(self.engine.requests):
                self.engine.abort(rid)
                self._deliver(rid, exc)
            return
        for out in outputs:
            self._deliver(out.request_id, out)
        if self.on_step is not None:
            self.on_step(self.engine, outputs, time.perf_counter() - started)

    def _deliver(self, rid: str, item) -> None:
        stream = self._streams.get(rid)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, (stream.index, item))

    def _abort_all(self) -> None:
        """Shutdown: fail what is queued or running, so no handler waits forever."""
        error = EngineDeadError("the server is shutting down")
        for command, rid, *_ in self._inbox_items():
            if command == "add":
                self._deliver(rid, error)
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            self._deliver(rid, error)
