"""A live server on a free loopback port, in this process so tests can look inside the engine."""

from __future__ import annotations

import pytest

from effinfer.serving.api_server import ServerConfig
from helpers import API_KEY, LiveServer, free_port, make_engine


@pytest.fixture(scope="module")
def live(smollm2_fp32):
    engine = make_engine(smollm2_fp32, num_blocks=512, max_num_seqs=64, max_model_len=1024)
    config = ServerConfig(port=free_port(), api_keys=[API_KEY, "second-key"], served_model_name="smol",
                          max_n=8, max_requests_in_flight=96, max_body_bytes=200_000)
    with LiveServer(engine, config) as server:
        yield server


@pytest.fixture()
def client(live):
    import openai

    return openai.OpenAI(base_url=live.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
