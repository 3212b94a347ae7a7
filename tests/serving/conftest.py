"""The OpenAI client of the live server (`live`, tests/conftest.py)."""

from __future__ import annotations

import pytest

from helpers import API_KEY


@pytest.fixture()
def client(live):
    import openai

    return openai.OpenAI(base_url=live.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
