"""The Content-Security-Policy in a real browser: every main console page, a streamed chat answer,
an htmx form and the staff sign-in run without one violation report, and the policy carries a
nonce that the page's scripts hold."""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from tests.agents.conftest import ChatWorld
from tests.browser.conftest import Portal, sign_in
from tests.scripted_llm import ScriptedLLM

pytestmark = [pytest.mark.browser, pytest.mark.django_db]

# Runs in every document before its own scripts (an init script is not subject to the page's policy).
RECORD_VIOLATIONS = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.effectiveDirective} blocked ${e.blockedURI || "inline"} at ` +
                              `${e.sourceFile}:${e.lineNumber} ${e.sample || ""}`);
});
"""


class PolicyWatch:
    """Collects violation reports of every page of a context: the securitypolicyviolation events
    (read before each navigation) and Chromium's console errors about the policy."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.violations: list[str] = []
        page.context.add_init_script(RECORD_VIOLATIONS)
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.violations.append(f"{self.page.url}: {message.text}")

    def collect(self) -> None:
        events = self.page.evaluate("window.__cspViolations || []")
        self.violations.extend(f"{self.page.url}: {event}" for event in events)

    def visit(self, url: str) -> None:
        """Open ``url``; its policy must carry a nonce that the page's scripts hold."""
        self.collect()
        response = self.page.goto(url)
        assert response is not None and response.ok, url
        policy = response.headers.get("content-security-policy", "")
        nonce = re.search(r"script-src [^;]*'nonce-([^']+)'", policy)
        assert nonce, f"{url}: {policy!r}"
        # Browsers hide a nonce attribute from the DOM once the element is parsed; .nonce keeps it.
        nonces = self.page.evaluate("Array.from(document.scripts, (s) => s.nonce)")
        assert nonces and set(nonces) == {nonce.group(1)}, (url, nonces)


def test_the_console_runs_under_its_policy_without_a_violation(
        portal: Portal, celery_worker: Any, live_agent: ChatWorld, scripted_llm: ScriptedLLM, page: Any) -> None:
    watch = PolicyWatch(page)
    watch.visit(portal.url(path="/accounts/login/"))
    sign_in(page, portal, "owner@acme.test")
    for path in ("/", "/agents/", f"/agents/{live_agent.agent_id}/", "/kb/", "/kb/search/", "/keys/", "/audit/",
                 "/settings/", "/accounts/2fa/"):
        watch.visit(portal.url(path=path))

    # An htmx form: the request, the swapped fragment and the toast it triggers.
    watch.visit(portal.url(path="/members/"))
    email = f"csp-{uuid.uuid4().hex[:10]}@example.com"
    page.locator("#id_email").fill(email)
    page.get_by_role("button", name="Send invitation").click()
    page.get_by_test_id("invitation-table").locator("tr", has_text=email).wait_for()
    page.locator("#toasts").filter(has_text=email).wait_for()

    # A chat whose answer streams in over the socket, rendered as Markdown.
    scripted_llm.script(live_agent.model, tokens=["The", " refund", " window", " is", " **30", " days**."],
                        token_interval=0.1)
    watch.visit(portal.url(path="/chat/"))
    page.locator("select[name=agent]").select_option(label="Helpdesk (live)")
    page.locator("input[name=title]").fill(f"CSP {uuid.uuid4().hex[:6]}")
    with page.expect_websocket(), page.expect_navigation():
        page.get_by_role("button", name="New chat").click()
    page.locator("#chat-form textarea").fill("How long is the refund window?")
    page.get_by_role("button", name="Send").click()
    page.locator("#chat-log .chat-turn").last.locator("[id$=-body] strong").wait_for(timeout=60_000)
    watch.visit(page.url)  # the same chat rendered by the server
    watch.collect()
    assert watch.violations == []


def test_the_staff_sign_in_runs_under_its_policy_without_a_violation(portal: Portal, page: Any) -> None:
    watch = PolicyWatch(page)
    watch.visit(portal.url("localhost", "/admin/"))  # redirected to the site's sign-in
    assert "/accounts/login/" in page.url
    page.locator("input[name=login]").fill(f"nobody-{uuid.uuid4().hex[:8]}@platform.test")
    page.locator("input[name=password]").fill("not the password")
    with page.expect_navigation():
        page.locator("form:has(input[name=password]) [type=submit]").click()
    watch.collect()
    assert watch.violations == []
