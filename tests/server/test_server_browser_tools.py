"""The served chat page shows a tool call and its arguments (real chromium, real server, real model)."""

from __future__ import annotations

import json
import os

import pytest

from tests.server.conftest import API_KEY

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing")
pytest.importorskip("llguidance", reason="forced tool calls need: pip install 'slimlm[structured]'")

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 16}},
                "required": ["city"],
            },
        },
    }
]


def test_page_shows_a_forced_tool_call_with_its_arguments(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"], headless=True
        )
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.fill("#api-key", API_KEY)
            page.dispatch_event("#api-key", "change")
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            page.fill("#tools", json.dumps(TOOLS))
            page.select_option("#tool_choice", "required")
            page.fill("#input", "What is the weather in Paris?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant .tool-call", timeout=120_000)
            page.wait_for_function("document.getElementById('send').textContent === 'Send'", timeout=120_000)
            shown = page.inner_text(".msg.assistant .tool-call")
            assert shown.startswith("\U0001f527 get_weather(")
            arguments = json.loads(shown[len("\U0001f527 get_weather(") : -1])
            assert set(arguments) == {"city"} and isinstance(arguments["city"], str)
            assert page.query_selector(".msg.error") is None
            history = page.evaluate("state.history")
            assert history[-1]["tool_calls"][0]["function"]["name"] == "get_weather"
        finally:
            browser.close()
