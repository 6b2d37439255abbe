"""Console pages: dashboard, settings, htmx fragments, and the demo seeder."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings
from django_otp.plugins.otp_totp.models import TOTPDevice
from django_tenants.utils import schema_context

from billing.services import usage_event_record
from compliance.models import AuditEvent
from tenants.models import ApiKey, Invitation, Tenant, User
from tests.conftest import HOST_A, World, api_client, host_client


def test_the_dashboard_shows_the_tenant_and_its_counts(world: World, django_assert_max_num_queries) -> None:  # type: ignore[no-untyped-def]
    with schema_context(world.tenant_a.schema_name):
        usage_event_record(kind="kb.query", quantity=1)
        usage_event_record(kind="llm.input_tokens", quantity=1200, unit_price=Decimal("0.000002"), model="m-test")
    client = host_client(HOST_A, world.user("owner"))
    with django_assert_max_num_queries(14):
        response = client.get("/")
    html = response.content.decode()
    assert response.status_code == 200
    assert "Acme Corp" in html
    assert 'data-testid="member-count">5<' in html
    # This month's tokens and cost, not event counts (tests/billing/test_usage_summary.py has more).
    assert 'data-testid="usage-tokens">1,200<' in html and 'data-testid="usage-cost">0.002400<' in html


def test_a_viewer_sees_no_usage_or_activity_on_the_dashboard(world: World) -> None:
    html = host_client(HOST_A, world.user("viewer")).get("/").content.decode()
    assert "Usage this month" not in html and "Recent activity" not in html


def test_an_owner_turns_on_required_2fa_and_it_is_audited(world: World) -> None:
    client = host_client(HOST_A, world.user("owner"))
    response = client.post("/settings/", {"require_2fa": "on"})
    assert response.status_code == 302
    assert Tenant.objects.get(pk=world.tenant_a.pk).require_2fa is True
    with schema_context(world.tenant_a.schema_name):
        assert AuditEvent.objects.get(action="tenant.settings_changed").payload == {"require_2fa": True}
    # The owner has no authenticator, so the next page asks for one.
    nxt = client.get("/members/")
    assert nxt.status_code == 302 and "/accounts/2fa/setup/" in nxt["Location"]


def test_an_admin_cannot_change_tenant_security_settings(world: World) -> None:
    response = host_client(HOST_A, world.user("admin")).post("/settings/", {"require_2fa": "on"})
    assert response.status_code == 403
    assert Tenant.objects.get(pk=world.tenant_a.pk).require_2fa is False


def test_htmx_requests_get_only_the_fragment(world: World) -> None:
    client = host_client(HOST_A, world.user("owner"))
    full = client.get("/members/")
    fragment = client.get("/members/", HTTP_HX_REQUEST="true")
    assert b"<html" in full.content
    assert b"<html" not in fragment.content and b'id="members-section"' in fragment.content
    assert "HX-Request" in fragment["Vary"] and "HX-Request" in full["Vary"]
    boosted = client.get("/members/", HTTP_HX_REQUEST="true", HTTP_HX_BOOSTED="true")
    assert b"<html" in boosted.content


def test_inviting_through_htmx_returns_the_section_and_a_toast(world: World) -> None:
    client = host_client(HOST_A, world.user("admin"))
    response = client.post("/members/", {"email": "htmx@example.com", "role": "viewer"}, HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert b"htmx@example.com" in response.content
    toast = json.loads(response["HX-Trigger"])["toast"]
    assert toast["level"] == "success" and "htmx@example.com" in toast["message"]


def test_inviting_without_javascript_redirects_with_a_message(world: World) -> None:
    client = host_client(HOST_A, world.user("admin"))
    response = client.post("/members/", {"email": "plain@example.com", "role": "viewer"}, follow=True)
    assert response.redirect_chain[-1][0] == "/members/"
    assert b"Invitation sent to plain@example.com" in response.content


def test_an_invalid_invitation_form_keeps_the_input_and_says_why(world: World) -> None:
    client = host_client(HOST_A, world.user("admin"))
    response = client.post("/members/", {"email": "viewer@acme.test", "role": "viewer"})
    assert response.status_code == 422
    assert b"already a member" in response.content
    response = client.post("/members/", {"email": "not an address", "role": "viewer"})
    assert response.status_code == 422
    assert not Invitation.objects.filter(tenant=world.tenant_a).exists()


def test_an_admin_sees_owners_read_only(world: World) -> None:
    html = host_client(HOST_A, world.user("admin")).get("/members/").content.decode()
    owner_row = html.split("owner@acme.test", 1)[1].split("</tr>", 1)[0]
    assert "<select" not in owner_row and "Remove" not in owner_row
    viewer_row = html.split("viewer@acme.test", 1)[1].split("</tr>", 1)[0]
    assert "<select" in viewer_row and 'value="owner"' not in viewer_row


def test_the_audit_trail_records_console_sign_ins(world: World) -> None:
    client = host_client(HOST_A)
    response = client.post(
        "/accounts/login/", {"login": "viewer@acme.test", "password": "correct horse battery staple"}
    )
    assert response.status_code == 302
    failed = host_client(HOST_A).post("/accounts/login/", {"login": "viewer@acme.test", "password": "wrong"})
    assert failed.status_code == 200
    with schema_context(world.tenant_a.schema_name):
        actions = list(AuditEvent.objects.filter(action__startswith="user.").values_list("action", flat=True))
    assert "user.logged_in" in actions and "user.login_failed" in actions


def test_public_sign_up_is_closed(world: World) -> None:
    response = host_client(HOST_A).post(
        "/accounts/signup/",
        {"email": "self@example.com", "password1": "a sturdy passphrase 42", "password2": "a sturdy passphrase 42"},
    )
    assert not User.objects.filter(email="self@example.com").exists()
    assert response.status_code in (200, 403)


@pytest.mark.parametrize("host", ["localhost", HOST_A])
def test_the_sign_in_page_offers_no_sign_up_link_while_sign_up_is_closed(world: World, host: str) -> None:
    html = host_client(host).get("/accounts/login/").content.decode()
    assert 'name="password"' in html  # the sign-in form itself is still there
    assert "/accounts/signup/" not in html and "sign up" not in html.lower()


def test_demo_seed_is_idempotent_and_its_credentials_work(world: World, tmp_path: Path) -> None:
    with override_settings(VAR_DIR=tmp_path):
        call_command("demo_seed", stdout=io.StringIO())
        first = json.loads((tmp_path / "demo-credentials").read_text())
        key = (tmp_path / "demo-api-key").read_text().strip()
        call_command("demo_seed", stdout=io.StringIO())
        second = json.loads((tmp_path / "demo-credentials").read_text())
        assert (tmp_path / "demo-api-key").read_text().strip() == key
    assert first == second
    assert oct((tmp_path / "demo-credentials").stat().st_mode & 0o777) == "0o600"
    assert Tenant.objects.filter(slug="demo").count() == 1
    assert ApiKey.objects.filter(tenant__slug="demo", revoked_at__isnull=True).count() == 1
    assert api_client("demo.localhost", key).get("/api/v1/me").json()["tenant"]["slug"] == "demo"
    owner = User.objects.get(email=first["owner_email"])
    assert owner.check_password(first["owner_password"])
    staff = User.objects.get(email=first["staff_email"])
    assert staff.is_staff and TOTPDevice.objects.filter(user=staff, confirmed=True).count() == 1
    assert first["staff_totp_uri"].startswith("otpauth://totp/")


def test_demo_seed_refuses_to_run_in_production(world: World) -> None:
    with override_settings(DEVELOPMENT=False), pytest.raises(CommandError, match="development only"):
        call_command("demo_seed")


@pytest.mark.parametrize(("path", "current"), [
    ("/", 'aria-current="page" href="/"'),
    ("/agents/", 'aria-current="page" href="/agents/"'),
    ("/accounts/2fa/", 'aria-current="page">Security'),
    ("/accounts/password/change/", 'aria-current="page">Security'),
])
def test_the_page_highlights_its_own_navigation_item_only(world: World, path: str, current: str) -> None:
    html = host_client(HOST_A, world.user("owner")).get(path).content.decode()
    assert html.count('aria-current="page"') == 1, path
    assert current in html, path
    assert 'href="#main">Skip to content</a>' in html and 'id="main"' in html
