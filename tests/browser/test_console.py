"""The console in a real browser: sign-in, htmx forms, one-time secrets, no-JavaScript pages.

Each test signs in through the login form in a fresh browser context. Rows they create
(invitations, keys) are committed by the server under unique names and never removed: the
audit chain is append-only, and no other test depends on their absence.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import Portal, sign_in

pytestmark = [pytest.mark.browser, pytest.mark.django_db]


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_the_owner_signs_in_through_the_form_and_lands_on_the_dashboard(page: Any, portal: Portal,
                                                                        tmp_path: Path) -> None:
    page.goto(portal.url(path="/"))
    expect(page).to_have_url(portal.url(path="/accounts/login/?next=/"))
    sign_in(page, portal, "owner@acme.test")
    expect(page).to_have_url(portal.url(path="/"))
    expect(page.locator("main h1")).to_have_text("Acme Corp")
    nav = page.get_by_role("navigation", name="Console")
    expect(nav).to_contain_text("owner@acme.test")
    expect(nav.get_by_role("link", name="Dashboard")).to_have_attribute("aria-current", "page")
    expect(page.get_by_test_id("member-count")).to_have_text("5")
    screenshot = tmp_path / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 0


def test_unknown_credentials_keep_the_visitor_on_the_login_form(page: Any, portal: Portal) -> None:
    # An unknown address, not a persona's: failed sign-ins are rate-limited per address, and the
    # limit outlives the test run (it is kept in Redis).
    page.goto(portal.url(path="/accounts/login/"))
    page.locator("input[name=login]").fill(f"{_unique('nobody')}@acme.test")
    page.locator("input[name=password]").fill("not the password")
    with page.expect_navigation():
        page.locator("form:has(input[name=password]) [type=submit]").click()
    expect(page).to_have_url(portal.url(path="/accounts/login/"))
    expect(page.locator("input[name=password]")).to_be_visible()
    page.goto(portal.url(path="/members/"))
    expect(page).to_have_url(portal.url(path="/accounts/login/?next=/members/"))


def test_an_invitation_appears_without_a_page_reload(page: Any, new_page: Any, portal: Portal) -> None:
    sign_in(page, portal, "owner@acme.test")
    page.goto(portal.url(path="/members/"))
    # A full page load would replace the window and lose this.
    page.evaluate("window.__sameDocument = 'kept'")
    email = f"{_unique('invitee')}@example.com"
    page.locator("#id_email").fill(email)
    page.locator("#id_role").select_option("operator")
    with page.expect_response(lambda r: r.request.method == "POST" and r.url == portal.url(path="/members/")) as info:
        page.get_by_role("button", name="Send invitation").click()
    response = info.value
    assert response.status == 200
    assert response.request.headers.get("hx-request") == "true"

    invitations = page.get_by_test_id("invitation-table")
    row = invitations.locator("tr", has_text=email)
    expect(row).to_contain_text("Operator")
    expect(row).to_contain_text("owner@acme.test")
    toasts = page.locator("#toasts")
    expect(toasts).to_contain_text(f"Invitation sent to {email}")
    assert page.evaluate("window.__sameDocument") == "kept"
    # The form was re-rendered empty, ready for the next invitation.
    expect(page.locator("#id_email")).to_have_value("")

    # The link in the toast points at this server (PUBLIC_PORT) and opens the invitation.
    link = re.search(r"Link: (\S+)", toasts.inner_text())
    assert link is not None and link.group(1).startswith(portal.url(path="/invitations/"))
    invitee = new_page()
    invitee.goto(link.group(1))
    expect(invitee.locator("main")).to_contain_text(email)
    expect(invitee.locator("main")).to_contain_text("Create your account")


def test_an_invalid_invitation_shows_the_error_in_place(page: Any, portal: Portal) -> None:
    sign_in(page, portal, "owner@acme.test")
    page.goto(portal.url(path="/members/"))
    page.evaluate("window.__sameDocument = 'kept'")
    page.locator("#id_email").fill("not an address")
    page.get_by_role("button", name="Send invitation").click()
    expect(page.locator("#id_email")).to_have_class(re.compile(r"\bis-invalid\b"))
    expect(page.locator("#members-section .invalid-feedback")).to_contain_text("valid email")
    assert page.evaluate("window.__sameDocument") == "kept"


def test_a_new_keys_secret_is_shown_once_and_the_key_can_be_revoked(page: Any, portal: Portal) -> None:
    sign_in(page, portal, "owner@acme.test")
    page.goto(portal.url(path="/keys/"))
    name = _unique("browser key")
    page.locator("#id_name").fill(name)
    page.get_by_role("button", name="Create key").click()

    secret_box = page.locator("#new-secret")
    expect(secret_box).to_be_visible()
    expect(page.get_by_test_id("new-secret")).to_contain_text(name)
    secret = secret_box.inner_text().strip()
    assert secret.startswith("aop_")
    assert portal.api_get("/api/v1/me", key=secret) == 200

    page.reload()
    row = page.get_by_test_id("key-table").locator("tr", has_text=name)
    expect(row).to_contain_text("active")
    expect(page.locator("#new-secret")).to_have_count(0)
    assert secret not in page.content()

    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", accept)
    row.get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("revoked")
    expect(row.get_by_role("button", name="Revoke")).to_have_count(0)
    assert len(dialogs) == 1 and dialogs[0].startswith("Revoke ")
    assert portal.api_get("/api/v1/me", key=secret) == 401


def test_dismissing_the_revoke_confirmation_keeps_the_key(page: Any, portal: Portal) -> None:
    sign_in(page, portal, "owner@acme.test")
    page.goto(portal.url(path="/keys/"))
    name = _unique("kept key")
    page.locator("#id_name").fill(name)
    page.get_by_role("button", name="Create key").click()
    secret = page.locator("#new-secret").inner_text().strip()
    row = page.get_by_test_id("key-table").locator("tr", has_text=name)

    dismissed: list[str] = []
    posts: list[str] = []

    def dismiss(dialog: Any) -> None:
        dismissed.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", dismiss)
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    with page.expect_event("dialog"):
        row.get_by_role("button", name="Revoke").click()
    assert len(dismissed) == 1
    page.reload()
    expect(page.get_by_test_id("key-table").locator("tr", has_text=name)).to_contain_text("active")
    assert posts == []
    assert portal.api_get("/api/v1/me", key=secret) == 200


def test_members_and_audit_pages_work_without_javascript(new_page: Any, portal: Portal) -> None:
    page = new_page(java_script_enabled=False)
    sign_in(page, portal, "owner@acme.test")
    expect(page.locator("main h1")).to_have_text("Acme Corp")

    page.goto(portal.url(path="/members/"))
    members = page.get_by_test_id("member-table")
    for persona in ("owner", "admin", "operator", "viewer", "auditor"):
        expect(members).to_contain_text(f"{persona}@acme.test")

    page.goto(portal.url(path="/audit/"))
    audit = page.get_by_test_id("audit-table")
    expect(audit).to_be_visible()
    expect(audit.locator("tbody tr").first).to_be_visible()
    expect(audit).to_contain_text("user.logged_in")


def test_an_invitation_without_javascript_posts_and_redirects(new_page: Any, portal: Portal) -> None:
    page = new_page(java_script_enabled=False)
    sign_in(page, portal, "owner@acme.test")
    page.goto(portal.url(path="/members/"))
    email = f"{_unique('nojs')}@example.com"
    page.locator("#id_email").fill(email)
    with page.expect_navigation():
        page.get_by_role("button", name="Send invitation").click()
    expect(page).to_have_url(portal.url(path="/members/"))
    expect(page.locator("#messages")).to_contain_text(f"Invitation sent to {email}")
    expect(page.get_by_test_id("invitation-table")).to_contain_text(email)


def test_a_viewer_sees_no_keys_or_settings_links(page: Any, portal: Portal) -> None:
    sign_in(page, portal, "viewer@acme.test")
    expect(page.locator("main h1")).to_have_text("Acme Corp")
    nav = page.get_by_role("navigation", name="Console")
    expect(nav.get_by_role("link", name="Dashboard")).to_be_visible()
    expect(nav.get_by_role("link", name="Members")).to_be_visible()
    expect(nav.get_by_role("link", name="API keys")).to_have_count(0)
    expect(nav.get_by_role("link", name="Settings")).to_have_count(0)
    expect(nav.get_by_role("link", name="Audit")).to_have_count(0)
    response = page.goto(portal.url(path="/keys/"))
    assert response is not None and response.status == 403


def test_the_outsider_is_refused_tenant_a_in_the_browser(page: Any, portal: Portal) -> None:
    sign_in(page, portal, "outsider@globex.test", host="globex.localhost")
    expect(page.locator("main h1")).to_have_text("Globex")
    # Cookies are per host: on A's host the outsider signs in again and is still refused.
    sign_in(page, portal, "outsider@globex.test")
    expect(page.locator("body")).not_to_contain_text("Acme Corp")
    response = page.goto(portal.url(path="/members/"))
    assert response is not None and response.status == 403
    expect(page.locator("body")).not_to_contain_text("viewer@acme.test")
