"""A real headless browser (Debian's chromium, driven by Playwright) chats through the served page."""

from __future__ import annotations

import os

import pytest

from tests.server.conftest import API_KEY, greedy_chat_reference

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            yield page
        finally:
            browser.close()


def test_typed_message_gets_a_streamed_reply(page, reference_llm):
    message, tokens = "What is the sun?", 12
    expected = greedy_chat_reference(reference_llm, [message], tokens)[0]
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').textContent === 'smollm2-135m'")
    page.fill("#temperature", "0")
    page.fill("#repetition_penalty", "1")
    page.fill("#max_tokens", str(tokens))
    # record every text the reply shows while it streams in
    page.evaluate("""() => {
        window.replyTexts = [];
        new MutationObserver(() => {
            const reply = document.querySelector('.msg.assistant .content');
            const text = reply ? reply.textContent : '';
            if (text && text !== window.replyTexts[window.replyTexts.length - 1]) window.replyTexts.push(text);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("#input", message)
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.assistant")
    page.wait_for_function("document.getElementById('send').textContent === 'Send'", timeout=60_000)
    assert page.inner_text(".msg.user .content") == message
    assert page.eval_on_selector(".msg.assistant .content", "e => e.textContent") == expected
    shown = page.evaluate("window.replyTexts")
    assert len(shown) >= 3 and shown[-1] == expected  # the reply arrived in pieces, not at once
    assert all(expected.startswith(text) for text in shown)
    assert "tokens in" in page.inner_text("#status")
    assert page.query_selector(".msg.error") is None


def test_new_conversation_button_clears_the_chat(page):
    page.click("#new-chat")
    assert page.query_selector_all(".msg") == []
    assert page.evaluate("state.history.length") == 0


def test_failed_request_leaves_no_empty_box_and_is_not_resent(page, server):
    """Issue 22 item 14: after a failed request the empty assistant box used to stay, the failed turn
    (with an empty assistant message) was sent again with the next question, and the status line kept
    an earlier "stopped"."""
    page.click("#new-chat")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').textContent === 'smollm2-135m'")
    page.fill("#temperature", "0")
    # a stopped turn first, so the status line says "stopped"
    page.fill("#max_tokens", "400")
    page.fill("#input", "Tell me a long story about a dragon.")
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('send').textContent === 'Stop'")
    page.click("#send")
    page.wait_for_function("document.getElementById('send').textContent === 'Send'", timeout=60_000)
    assert page.inner_text("#status") == "stopped"
    turns_before = page.evaluate("state.history.length")
    # now a request the server refuses (max_tokens beyond the context): a 400
    page.fill("#max_tokens", "100000")
    page.fill("#input", "First question")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.error")
    page.wait_for_function("document.getElementById('send').textContent === 'Send'", timeout=60_000)
    assert "maximum context length" in page.inner_text(".msg.error .content")
    assert page.inner_text("#status") != "stopped"
    assert all(
        e.strip()
        for e in page.eval_on_selector_all(".msg.assistant .content", "l => l.map(e => e.textContent)")
    )
    assert page.evaluate("state.history.length") == turns_before
    # the next question is sent without the failed turn
    page.fill("#max_tokens", "3")
    bodies = []
    page.on(
        "request", lambda r: bodies.append(r.post_data_json) if r.url.endswith("/chat/completions") else None
    )
    page.fill("#input", "Second question")
    page.press("#input", "Enter")
    page.wait_for_function("document.getElementById('send').textContent === 'Send'", timeout=60_000)
    sent = bodies[-1]["messages"]
    contents = [m["content"] for m in sent]
    assert "First question" not in contents and contents[-1] == "Second question"
    assert all(m["content"] for m in sent if m["role"] == "assistant")
    assert "tokens in" in page.inner_text("#status")


def test_favicon_is_served_without_a_key(page, server):
    import httpx

    response = httpx.get(server.url + "/favicon.ico", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/svg+xml")
    assert page.eval_on_selector("link[rel=icon]", "e => e.getAttribute('href')") == "/favicon.ico"
