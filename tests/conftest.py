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
    """The default model in fp32, loaded once; engines in tests reuse it (`LLMEngine(config, loaded)`)."""
    from effinfer.models import load_model

    return load_model(str(smollm2_path), torch.float32, show_progress=False)


def make_engine(loaded, **config):
    """An engine on an already-loaded model, with small defaults that keep tests fast."""
    from effinfer.config import EngineConfig
    from effinfer.engine.llm_engine import LLMEngine

    config = {"dtype": "float32", "device": "cpu", "num_blocks": 256, "show_progress": False, **config}
    return LLMEngine(EngineConfig.from_kwargs(**config), loaded)


def run_to_completion(engine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals
