"""The web chat page's conversation in headless Chromium: what each request carries after a reset, a failed turn and
a conversation grown past the model's context; Enter while an input method composes; the label following the served
model; the reply's speed counted from its first token."""

from __future__ import annotations

import json
import time

import pytest
from browser import launch, sync_api

from lmforge.serve.server import ModelServer

KEY = "page-key"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = launch(pw)
        yield b
        b.close()


def open_page(browser, srv):
    """The page on ``srv``, with the bodies of the chat requests it sends collected in ``page.bodies``."""
    page = browser.new_page()
    page.set_default_timeout(30000)
    page.bodies = []
    page.on("request", lambda r: page.bodies.append(json.loads(r.post_data)) if r.method == "POST" else None)
    page.goto(srv.url + "/")
    return page


def say(page, text: str, done: int) -> None:
    """Send ``text`` and wait until ``done`` replies have ended."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function(f"document.querySelectorAll('.assistant[data-done]').length + "
                           f"document.querySelectorAll('.error').length >= {done}")


@pytest.fixture(scope="module")
def keyed(stories):
    srv = ModelServer(*stories, "stories260K.bin", "127.0.0.1", 0, max_batch=4, api_key=KEY).start()
    yield srv
    srv.close()


def test_a_reset_while_streaming_keeps_nothing_of_the_old_conversation(browser, keyed, monkeypatch):
    step = keyed.engine._decode_step

    def slow_step() -> None:  # a reply of stories260K streams whole in a few ms: one could end between two polls
        time.sleep(0.002)
        step()

    monkeypatch.setattr(keyed.engine, "_decode_step", slow_step)
    page = open_page(browser, keyed)
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.fill("#temperature", "1")
    page.fill("#max_tokens", "400")
    page.fill("#input", "Tell me a long story.")
    page.press("#input", "Enter")
    page.wait_for_function("(() => { const b = document.querySelector('.assistant[data-streaming] .text');"
                           " return b && b.textContent.length > 0; })()")
    page.click("#reset")
    page.fill("#max_tokens", "5")
    say(page, "Fresh start", 1)
    assert page.bodies[-1]["messages"] == [{"role": "user", "content": "Fresh start"}]
    page.close()


def test_a_failed_turn_is_not_sent_again(browser, keyed):
    page = open_page(browser, keyed)
    page.evaluate("localStorage.clear()")
    page.fill("#apikey", "")
    page.dispatch_event("#apikey", "change")
    say(page, "Hello without key", 1)
    assert "API key" in page.inner_text(".error")
    assert page.input_value("#input") == "Hello without key"  # back in the box to retry
    assert page.locator(".assistant").count() == 0  # no empty reply left on the screen
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.fill("#max_tokens", "5")
    say(page, "Hello with key", 1)
    assert page.bodies[-1]["messages"] == [{"role": "user", "content": "Hello with key"}]
    page.close()


def test_a_long_conversation_leaves_out_its_oldest_turns(browser, stories):
    """With the page's defaults (no max tokens: as many as fit) a small context fills within a few turns; the page
    drops the oldest exchanges and says so, where every further message used to fail."""
    srv = ModelServer(*stories, "stories260K.bin", "127.0.0.1", 0, max_batch=2, max_len=96).start()
    try:
        page = open_page(browser, srv)
        page.fill("#temperature", "0")
        for i in range(4):
            say(page, f"Tell me about the cat number {i}.", i + 1)
        assert page.locator(".error").count() == 0, page.inner_text(".error")
        assert "max_tokens" not in page.bodies[0]  # the default: whatever fits
        assert page.locator(".assistant[data-done] .text").count() == 4
        assert "left out to fit the model's context" in page.inner_text("#log")
        first = page.bodies[-1]["messages"][0]["content"]
        assert first != "Tell me about the cat number 0."  # the oldest turn was left out of the last request
    finally:
        srv.close()


def test_enter_that_picks_an_input_method_candidate_does_not_send(browser, keyed):
    page = open_page(browser, keyed)
    page.fill("#input", "你好")
    page.evaluate("""document.getElementById('input').dispatchEvent(new KeyboardEvent('keydown',
        {key: 'Enter', isComposing: true, keyCode: 229, bubbles: true, cancelable: true}))""")
    page.wait_for_timeout(300)
    assert page.bodies == [] and page.input_value("#input") == "你好"
    page.close()


def test_the_label_follows_the_served_model_and_speed_counts_from_the_first_token(browser, keyed):
    page = open_page(browser, keyed)
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.wait_for_function("document.getElementById('model').textContent.includes('stories260K.bin')")
    page.evaluate("modelId = 'an-older-model'; document.getElementById('model').textContent = 'an-older-model'")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    say(page, "Hi", 1)
    page.wait_for_function("document.getElementById('model').textContent.includes('stories260K.bin')")
    assert "model" not in page.bodies[-1]  # the served one answers
    stats = page.inner_text(".assistant .stats")
    assert "first after" in stats and "tok/s" in stats, stats
    page.close()
