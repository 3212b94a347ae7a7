"""Helpers shared by the tests: engines on an already-loaded model, and a live server on loopback."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from effinfer.serving.api_server import ServerConfig, build_app


def make_engine(loaded, **config):
    """An engine on an already-loaded model, with small defaults that keep tests fast."""
    from effinfer.config import EngineConfig
    from effinfer.llm import build_engine

    config = {"dtype": "float32", "device": "cpu", "num_blocks": 256, "show_progress": False, **config}
    return build_engine(EngineConfig.from_kwargs(**config), loaded)


@contextmanager
def one_gguf_parse():
    """Inside the block, transformers parses each GGUF file once: it builds a `gguf.GGUFReader` for the
    tokenizer, again for the config and again for the weights, and each parse walks the vocabulary's
    strings in Python (~19 s for Gemma 3's 262k tokens). The readers are read-only, so one per file serves all."""
    import gguf
    import pytest

    readers, parse = {}, gguf.GGUFReader

    def shared_reader(path, mode="r"):
        if (str(path), mode) not in readers:
            readers[str(path), mode] = parse(path, mode)
        return readers[str(path), mode]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared_reader)
        yield


def run_to_completion(engine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


API_KEY = "test-key-1"


class LiveServer:
    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.app = build_app(engine, config)
        self.port = config.port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self):
        self._thread.start()
        deadline = time.time() + 30
        while not self._server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self._server.should_exit = True
        self._thread.join(30)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """True once the engine holds no request and every block is back in the pool."""
        deadline = time.time() + timeout
        blocks = self.engine.block_manager
        while time.time() < deadline:
            if not self.engine.requests and blocks.num_free_blocks == blocks.num_blocks:
                return True
            time.sleep(0.05)
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                children.append(int(entry.name))
    return children


def worker_pids(parent: int) -> list[int]:
    return [p for p in child_pids(parent)
            if b"effinfer.distributed.workers" in Path(f"/proc/{p}/cmdline").read_bytes()]
