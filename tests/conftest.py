"""Shared fixtures: tiny random-weight models for unit tests, the real catalog models where parity matters."""

from __future__ import annotations

import pytest
import torch

from effinfer.loader import catalog


@pytest.fixture(scope="session")
def smollm2_path():
    return catalog.pull("smollm2-135m-instruct", show_progress=False)


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_path):
    """The default model in fp32, loaded once; engines in tests reuse it (`build_engine(config, loaded)`)."""
    from effinfer.models import load_model

    return load_model(str(smollm2_path), torch.float32, show_progress=False)


@pytest.fixture(scope="module")
def live(smollm2_fp32):
    """A live server on a free loopback port, in this process so tests can look inside the engine."""
    from effinfer.serving.api_server import ServerConfig
    from helpers import API_KEY, LiveServer, free_port, make_engine

    engine = make_engine(smollm2_fp32, num_blocks=512, max_num_seqs=64, max_model_len=1024)
    config = ServerConfig(port=free_port(), api_keys=[API_KEY, "second-key"], served_model_name="smol",
                          max_n=8, max_requests_in_flight=96, max_body_bytes=200_000)
    with LiveServer(engine, config) as server:
        yield server
