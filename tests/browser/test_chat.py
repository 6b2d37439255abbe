"""Chat in a real browser: open a session from the console, ask, watch the answer stream in."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from tests.agents.conftest import ChatWorld
from tests.browser.conftest import Portal, sign_in
from tests.scripted_llm import ScriptedLLM

pytestmark = [pytest.mark.browser, pytest.mark.django_db]

# Records every text the streaming span of a turn shows, so the test can tell streamed tokens
# from an answer that arrived all at once.
WATCH_STREAM = """() => {
  window.__streamed = [];
  new MutationObserver(() => {
    document.querySelectorAll('[id^="turn-"][id$="-text"]').forEach((el) => {
      if (el.textContent) { window.__streamed.push(el.textContent); }
    });
  }).observe(document.getElementById('chat-log'), {childList: true, subtree: true, characterData: true});
  window.__notReloaded = true;
}"""


def test_an_operator_opens_a_chat_and_sees_the_answer_stream_in(
        portal: Portal, celery_worker: Any, live_agent: ChatWorld, scripted_llm: ScriptedLLM, page: Any) -> None:
    scripted_llm.script(live_agent.model, tokens=["The", " refund", " window", " is", " **30", " days**."],
                        token_interval=0.25)
    sign_in(page, portal, "operator@acme.test")
    page.goto(portal.url(path="/chat/"))
    title = f"Refunds {uuid.uuid4().hex[:6]}"
    page.locator("select[name=agent]").select_option(label="Helpdesk (live)")
    page.locator("input[name=title]").fill(title)
    with page.expect_websocket() as socket, page.expect_navigation():
        page.get_by_role("button", name="New chat").click()
    assert re.search(r"/chat/\d+/$", page.url)
    assert page.locator("h1").inner_text() == title
    assert "/ws/chat/" in socket.value.url

    page.evaluate(WATCH_STREAM)
    page.locator("#chat-form textarea").fill("How long is the refund window?")
    page.get_by_role("button", name="Send").click()

    turn = page.locator("#chat-log .chat-turn").last
    turn.locator("[id$=-question]").filter(has_text="How long is the refund window?").wait_for()
    answer = turn.locator("[id$=-body] strong")
    answer.wait_for(timeout=60_000)
    assert answer.inner_text() == "30 days"
    assert turn.locator("[id$=-body]").inner_text().strip() == "The refund window is 30 days."
    assert turn.locator("[id$=-status]").get_attribute("data-status") == "completed"
    streamed = page.evaluate("window.__streamed")
    assert any(text.startswith("The") and "days" not in text for text in streamed), streamed
    assert page.evaluate("window.__notReloaded") is True, "the answer arrived over the socket, in place"
    assert page.locator("#chat-form textarea").input_value() == ""

    # Stop a long answer midway: the worker keeps what was written and the turn says so.
    scripted_llm.script(live_agent.model, tokens=[f" word{n}" for n in range(60)], token_interval=0.2)
    page.locator("#chat-form textarea").fill("Tell me everything.")
    page.get_by_role("button", name="Send").click()
    turn = page.locator("#chat-log .chat-turn").last
    turn.locator("[id$=-question]").filter(has_text="Tell me everything.").wait_for()
    turn.locator("[id$=-text]").filter(has_text="word1").wait_for()
    turn.get_by_role("button", name="Stop").click()
    turn.locator("[id$=-status][data-status=cancelled]").wait_for(timeout=30_000)
    assert "word59" not in turn.inner_text()

    # A failed answer offers a retry that asks the same question again.
    scripted_llm.script(live_agent.model, failure="status:400")
    page.locator("#chat-form textarea").fill("Is shipping free?")
    page.get_by_role("button", name="Send").click()
    failed = page.locator("#chat-log .chat-turn").last
    failed.locator("[id$=-question]").filter(has_text="Is shipping free?").wait_for()
    failed.locator("[id$=-status][data-status=failed]").wait_for(timeout=30_000)
    scripted_llm.script(live_agent.model, tokens=["Yes, ", "over $50."])
    failed.get_by_role("button", name="Retry").click()
    retried = page.locator("#chat-log .chat-turn").last
    retried.locator("[id$=-status][data-status=completed]").wait_for(timeout=60_000)
    assert retried.locator("[id$=-question]").inner_text() == "Is shipping free?"
    assert retried.locator("[id$=-body]").inner_text().strip() == "Yes, over $50."

    # A reload shows the same history from the database, rendered the same way.
    page.reload()
    turns = page.locator("#chat-log .chat-turn")
    assert turns.nth(0).locator("[id$=-body] strong").inner_text() == "30 days"
    assert turns.nth(1).locator("[id$=-status]").get_attribute("data-status") == "cancelled"
    assert turns.last.locator("[id$=-body]").inner_text().strip() == "Yes, over $50."
