"""Headless Chromium (Debian's) driven by Playwright loads the chat page, sends a message and sees
streamed text appear."""

from __future__ import annotations

import shutil

import pytest

from helpers import API_KEY

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it as root)")
def test_chat_page_streams_a_reply(live):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        try:
            page = browser.new_page()
            page.goto(live.base_url + "/")
            page.fill("#api_key", API_KEY)
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.getElementById('model').textContent === 'smol'", timeout=20_000)
            page.fill("#max_tokens", "24")
            page.fill("#input", "Say hello in French.")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.user")
            page.wait_for_function(
                "document.querySelector('.msg.assistant') && document.querySelector('.msg.assistant').textContent.length > 0",
                timeout=60_000)
            page.wait_for_function("document.getElementById('stats').textContent.includes('tokens/s')", timeout=60_000)
            assert "Error" not in page.text_content(".msg.assistant")
        finally:
            browser.close()
