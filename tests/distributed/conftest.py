"""Shared by the tensor- and pipeline-parallel tests."""

from __future__ import annotations

import pytest

from tests.tiny_models import save_tiny_folder


@pytest.fixture(scope="session")
def llama_folder(tmp_path_factory):
    """A tiny random Llama folder (the model both split kinds are killed under)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_folder("llama", path)
    return path
