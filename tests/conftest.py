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
