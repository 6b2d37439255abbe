"""Two-factor authentication: TOTP enrolment, verification after sign-in, recovery codes, and
where 2FA is required (tenants that opt in, staff on the public host, the session API).

Codes are computed from the device's key with ``django_otp.oath.totp``, as an authenticator app
would. A TOTP device refuses a second attempt within a second of a failed one (django-otp
throttling) and never accepts the same time step twice, so each test uses a device for at most
one success, and a failure is never followed by an attempt that is expected to succeed.
"""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from django.test import Client
from django_otp.oath import totp
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice
from django_tenants.utils import schema_context

from compliance.models import AuditEvent
from tenants.models import Tenant, User
from tenants.views.security import recovery_codes_issue
from tests.conftest import HOST_A, World, host_client

PUBLIC_HOST = "localhost"
SETUP = "/accounts/2fa/setup/"
VERIFY = "/accounts/2fa/verify/"
SECURITY = "/accounts/2fa/"


def _code(device: TOTPDevice, steps_ahead: int = 0) -> str:
    """The code an authenticator app shows now (or ``steps_ahead`` 30-second steps later)."""
    value = totp(device.bin_key, step=device.step, t0=device.t0, digits=device.digits,
                 drift=device.drift + steps_ahead)
    return f"{value:0{device.digits}d}"


def _wrong_code(device: TOTPDevice) -> str:
    """A well-formed code that the device accepts in no step it could be checked against."""
    # The device tolerates one step either side; two steps cover a step boundary passing
    # between computing this and the request.
    valid = {_code(device, d) for d in range(-2, 3)}
    return next(c for c in ("000000", "111111", "222222", "333333", "444444", "555555") if c not in valid)


def _confirmed_device(user: User) -> TOTPDevice:
    return TOTPDevice.objects.create(user=user, name="authenticator", confirmed=True)


def _verify(client: Client, token: str, next_url: str = "/") -> Any:
    return client.post(f"{VERIFY}?next={next_url}", {"token": token})


def _verified_client(user: User, host: str = HOST_A) -> Client:
    """A client signed in as ``user`` whose session passed 2FA with a new confirmed device."""
    device = _confirmed_device(user)
    client = host_client(host, user)
    response = _verify(client, _code(device))
    assert response.status_code == 302, response.content
    return client


def _redirect(response: Any) -> tuple[str, dict[str, list[str]]]:
    """The path and the parsed query of a redirect's ``Location``."""
    location = urlsplit(response["Location"])
    return location.path, parse_qs(location.query)


def _recovery_codes(html: str) -> list[str]:
    listing = html.split('data-testid="recovery-codes"', 1)[1].split("</ul>", 1)[0]
    return re.findall(r"<li>\s*([a-z2-7]+)\s*</li>", listing)


def _audit_actions(tenant: Tenant) -> list[str]:
    with schema_context(tenant.schema_name):
        return list(AuditEvent.objects.order_by("seq").values_list("action", flat=True))


def _require_2fa(tenant: Tenant) -> None:
    tenant.require_2fa = True
    tenant.save(update_fields=["require_2fa"])


# --- Enrolment ---------------------------------------------------------------------------

def test_setup_shows_a_qr_code_and_the_secret_of_a_new_unconfirmed_device(world: World) -> None:
    user = world.user("viewer")
    response = host_client(HOST_A, user).get(SETUP)
    assert response.status_code == 200
    device = TOTPDevice.objects.get(user=user)
    assert device.confirmed is False
    html = response.content.decode()
    qr = html.split('data-testid="qr"', 1)[1].split("</div>", 1)[0]
    assert "<svg" in qr and "<path" in qr
    secret = base64.b32encode(device.bin_key).decode().rstrip("=")
    assert f'<code data-testid="totp-secret">{secret}</code>' in html


def test_setup_reuses_the_pending_device_on_reload(world: World) -> None:
    user = world.user("viewer")
    client = host_client(HOST_A, user)
    first = client.get(SETUP).content.decode()
    second = client.get(SETUP).content.decode()
    assert TOTPDevice.objects.filter(user=user).count() == 1
    secret = base64.b32encode(TOTPDevice.objects.get(user=user).bin_key).decode().rstrip("=")
    assert secret in first and secret in second


def test_setup_rejects_a_wrong_code_and_leaves_the_device_unconfirmed(world: World) -> None:
    user = world.user("viewer")
    client = host_client(HOST_A, user)
    client.get(SETUP)
    device = TOTPDevice.objects.get(user=user)
    response = client.post(SETUP, {"token": _wrong_code(device)})
    assert response.status_code == 200
    assert "That code is not valid" in response.content.decode()
    assert 'class="form-control w-auto is-invalid"' in response.content.decode()
    device.refresh_from_db()
    assert device.confirmed is False
    assert not StaticToken.objects.filter(device__user=user).exists()
    assert "user.2fa_enabled" not in _audit_actions(world.tenant_a)


def test_setup_with_the_right_code_confirms_the_device_and_shows_ten_recovery_codes_once(world: World) -> None:
    user = world.user("viewer")
    client = host_client(HOST_A, user)
    client.get(SETUP)
    device = TOTPDevice.objects.get(user=user)
    response = client.post(SETUP, {"token": _code(device), "next": "/members/"})
    assert response.status_code == 200
    device.refresh_from_db()
    assert device.confirmed is True
    codes = _recovery_codes(response.content.decode())
    assert len(codes) == 10 == len(set(codes))
    assert sorted(codes) == sorted(StaticToken.objects.filter(device__user=user).values_list("token", flat=True))
    assert 'href="/members/"' in response.content.decode()

    # The session is verified now, and the codes are never shown again.
    security = client.get(SECURITY)
    assert security.status_code == 200
    assert "Recovery codes left: 10" in security.content.decode()
    assert not any(code in security.content.decode() for code in codes)
    assert client.get(SETUP)["Location"] == SECURITY

    with schema_context(world.tenant_a.schema_name):
        event = AuditEvent.objects.filter(action="user.2fa_enabled").get()
    assert event.target_id == str(user.pk)
    assert event.actor_label == user.email
    assert event.payload == {"method": "totp"}
    assert not any(code in str(event.payload) for code in codes)


def test_the_2fa_enabled_event_is_not_written_to_another_tenants_chain(world: World) -> None:
    user = world.user("viewer")
    client = host_client(HOST_A, user)
    client.get(SETUP)
    client.post(SETUP, {"token": _code(TOTPDevice.objects.get(user=user))})
    assert "user.2fa_enabled" in _audit_actions(world.tenant_a)
    assert "user.2fa_enabled" not in _audit_actions(world.tenant_b)


def test_setup_does_not_let_an_unverified_session_replace_the_confirmed_device(world: World) -> None:
    # Someone who knows only the password must not be able to enrol their own authenticator.
    user = world.user("viewer")
    existing = _confirmed_device(user)
    client = host_client(HOST_A, user)
    response = client.get(SETUP)
    assert response.status_code == 302
    assert _redirect(response) == (VERIFY, {"next": [SETUP]})
    # The attacker's authenticator, pending as if an earlier visit had created it.
    pending = TOTPDevice.objects.create(user=user, name="authenticator", confirmed=False)
    response = client.post(SETUP, {"token": _code(pending)})
    assert response.status_code == 302
    assert list(TOTPDevice.objects.filter(user=user, confirmed=True)) == [existing]
    assert not StaticToken.objects.filter(device__user=user).exists()
    assert client.get("/").status_code == 302


# --- Verification after sign-in -----------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/members/", "/accounts/2fa/"])
def test_a_user_with_a_device_is_sent_to_verify_after_sign_in(world: World, path: str) -> None:
    _confirmed_device(world.user("operator"))
    response = host_client(HOST_A, world.user("operator")).get(path)
    assert response.status_code == 302
    assert _redirect(response) == (VERIFY, {"next": [path]})


def test_the_verify_redirect_keeps_the_whole_next_url(world: World) -> None:
    _confirmed_device(world.user("admin"))
    response = host_client(HOST_A, world.user("admin")).get("/audit/?action=user.2fa_enabled&page=2")
    assert response.status_code == 302
    assert _redirect(response) == (VERIFY, {"next": ["/audit/?action=user.2fa_enabled&page=2"]})


def test_the_current_totp_code_lets_the_user_in(world: World) -> None:
    user = world.user("operator")
    device = _confirmed_device(user)
    client = host_client(HOST_A, user)
    response = _verify(client, _code(device), "/members/")
    assert response.status_code == 302
    assert response["Location"] == "/members/"
    assert client.get("/members/").status_code == 200
    assert client.get(VERIFY)["Location"] == "/"


def test_verify_ignores_a_next_url_on_another_host(world: World) -> None:
    user = world.user("operator")
    device = _confirmed_device(user)
    response = _verify(host_client(HOST_A, user), _code(device), "https://evil.example.com/")
    assert response.status_code == 302
    assert response["Location"] == "/"


def test_a_wrong_code_is_refused(world: World) -> None:
    user = world.user("operator")
    device = _confirmed_device(user)
    client = host_client(HOST_A, user)
    response = _verify(client, _wrong_code(device))
    assert response.status_code == 200
    assert "That code is not valid." in response.content.decode()
    assert client.get("/").status_code == 302


def test_a_recovery_code_works_exactly_once(world: World) -> None:
    user = world.user("operator")
    _confirmed_device(user)
    code = recovery_codes_issue(user)[0]
    first = host_client(HOST_A, user)
    response = _verify(first, code, "/members/")
    assert response.status_code == 302
    assert response["Location"] == "/members/"
    assert first.get("/members/").status_code == 200
    assert StaticToken.objects.filter(device__user=user).count() == 9
    assert "user.recovery_code_used" in _audit_actions(world.tenant_a)

    second = host_client(HOST_A, user)
    again = _verify(second, code)
    assert again.status_code == 200
    assert "That code is not valid." in again.content.decode()
    assert second.get("/").status_code == 302


def test_verify_is_not_reachable_by_anonymous_visitors(world: World) -> None:
    response = Client(HTTP_HOST=HOST_A).post(VERIFY, {"token": "000000"})
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_a_verified_session_of_tenant_a_does_not_open_tenant_b(world: World) -> None:
    client = _verified_client(world.user("owner"))
    response = client.get("/members/", HTTP_HOST="globex.localhost")
    assert response.status_code == 403
    assert b"Globex" not in response.content


# --- Tenants that require 2FA ---------------------------------------------------------------

@pytest.mark.parametrize("persona", ["owner", "admin"])
def test_owners_and_admins_without_a_device_must_set_it_up_when_required(world: World, persona: str) -> None:
    _require_2fa(world.tenant_a)
    client = host_client(HOST_A, world.user(persona))
    response = client.get("/members/")
    assert response.status_code == 302
    assert _redirect(response) == (SETUP, {"required": ["1"], "next": ["/members/"]})
    page = client.get(response["Location"])
    assert page.status_code == 200
    assert "Your role requires two-factor authentication" in page.content.decode()


@pytest.mark.parametrize("persona", ["operator", "viewer", "auditor"])
def test_other_roles_are_not_forced_to_set_it_up(world: World, persona: str) -> None:
    _require_2fa(world.tenant_a)
    assert host_client(HOST_A, world.user(persona)).get("/members/").status_code == 200


def test_owners_are_not_forced_when_the_tenant_does_not_require_it(world: World) -> None:
    assert world.tenant_a.require_2fa is False
    assert host_client(HOST_A, world.user("owner")).get("/members/").status_code == 200


def test_tenant_a_requiring_2fa_does_not_affect_tenant_b(world: World) -> None:
    _require_2fa(world.tenant_a)
    assert host_client("globex.localhost", world.user("outsider")).get("/").status_code == 200


def test_an_owner_who_enrols_when_required_reaches_the_console(world: World) -> None:
    _require_2fa(world.tenant_a)
    user = world.user("owner")
    client = host_client(HOST_A, user)
    client.get(f"{SETUP}?required=1&next=/members/")
    device = TOTPDevice.objects.get(user=user)
    response = client.post(f"{SETUP}?required=1&next=/members/", {"token": _code(device)})
    assert response.status_code == 200
    assert len(_recovery_codes(response.content.decode())) == 10
    assert client.get("/members/").status_code == 200


# --- Staff on the public host ------------------------------------------------------------------

def test_staff_without_a_device_must_enrol_on_the_public_host(world: World) -> None:
    client = host_client(PUBLIC_HOST, world.user("staff"))
    response = client.get(SECURITY)
    assert response.status_code == 302
    assert _redirect(response) == (SETUP, {"required": ["1"], "next": [SECURITY]})
    assert client.get(response["Location"]).status_code == 200


def test_the_admin_index_is_not_shown_to_unverified_staff(world: World) -> None:
    client = host_client(PUBLIC_HOST, world.user("staff"))
    response = client.get("/admin/")
    assert response.status_code == 302
    assert _redirect(response) == (SETUP, {"required": ["1"], "next": ["/admin/"]})
    assert b"Site administration" not in response.content


def test_the_admin_index_sends_staff_with_a_device_to_verify(world: World) -> None:
    _confirmed_device(world.user("staff"))
    response = host_client(PUBLIC_HOST, world.user("staff")).get("/admin/")
    assert response.status_code == 302
    assert _redirect(response) == (VERIFY, {"next": ["/admin/"]})


def test_the_admin_index_opens_for_verified_staff(world: World) -> None:
    client = _verified_client(world.user("staff"), host=PUBLIC_HOST)
    response = client.get("/admin/")
    assert response.status_code == 200
    assert b"Site administration" in response.content


def test_staff_enrolment_is_recorded_in_the_public_chain(world: World) -> None:
    user = world.user("staff")
    client = host_client(PUBLIC_HOST, user)
    client.get(SETUP)
    client.post(SETUP, {"token": _code(TOTPDevice.objects.get(user=user))})
    with schema_context("public"):
        assert AuditEvent.objects.filter(action="user.2fa_enabled", target_id=str(user.pk)).exists()
    assert "user.2fa_enabled" not in _audit_actions(world.tenant_a)


@pytest.mark.parametrize("path", [SECURITY, SETUP, VERIFY])
def test_anonymous_visitors_of_the_public_hosts_2fa_pages_are_sent_to_sign_in(world: World, path: str) -> None:
    response = Client(HTTP_HOST=PUBLIC_HOST).get(path)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=")


# --- REST API with a session ---------------------------------------------------------------------

def test_the_api_refuses_a_session_that_has_not_passed_2fa(world: World) -> None:
    _confirmed_device(world.user("operator"))
    response = host_client(HOST_A, world.user("operator")).get("/api/v1/me")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "two_factor_required"


def test_the_api_refuses_an_owners_session_without_a_device_when_2fa_is_required(world: World) -> None:
    _require_2fa(world.tenant_a)
    response = host_client(HOST_A, world.user("owner")).get("/api/v1/me")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "two_factor_required"


def test_the_api_accepts_the_session_once_verified(world: World) -> None:
    client = _verified_client(world.user("operator"))
    response = client.get("/api/v1/me")
    assert response.status_code == 200, response.content
    assert response.json()["principal"]["label"] == "operator@acme.test"


def test_the_outsiders_verified_session_is_still_refused_by_a_s_api(world: World) -> None:
    client = _verified_client(world.user("outsider"), host="globex.localhost")
    response = client.get("/api/v1/me", HTTP_HOST=HOST_A)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "not_a_member"


# --- Turning 2FA off, new recovery codes ---------------------------------------------------------

def test_turning_2fa_off_is_refused_when_it_is_required(world: World) -> None:
    _require_2fa(world.tenant_a)
    user = world.user("admin")
    client = _verified_client(user)
    assert "it cannot be turned off" in client.get(SECURITY).content.decode()
    response = client.post("/accounts/2fa/disable/")
    assert response.status_code == 403
    assert TOTPDevice.objects.filter(user=user, confirmed=True).exists()
    assert "user.2fa_disabled" not in _audit_actions(world.tenant_a)


def test_staff_cannot_turn_2fa_off(world: World) -> None:
    user = world.user("staff")
    client = _verified_client(user, host=PUBLIC_HOST)
    assert client.post("/accounts/2fa/disable/").status_code == 403
    assert TOTPDevice.objects.filter(user=user, confirmed=True).exists()


def test_turning_2fa_off_is_allowed_when_it_is_optional(world: World) -> None:
    user = world.user("admin")
    client = _verified_client(user)
    recovery_codes_issue(user)
    response = client.post("/accounts/2fa/disable/")
    assert response.status_code == 302
    assert response["Location"] == SECURITY
    assert not TOTPDevice.objects.filter(user=user).exists()
    assert not StaticDevice.objects.filter(user=user).exists()
    assert "user.2fa_disabled" in _audit_actions(world.tenant_a)
    # Without a device, a new sign-in goes straight to the console.
    assert host_client(HOST_A, user).get("/").status_code == 200


def test_turning_2fa_off_needs_a_verified_session(world: World) -> None:
    user = world.user("viewer")
    _confirmed_device(user)
    response = host_client(HOST_A, user).post("/accounts/2fa/disable/")
    assert response.status_code == 302
    assert response["Location"].startswith(VERIFY)
    assert TOTPDevice.objects.filter(user=user).exists()


def test_new_recovery_codes_replace_the_old_ones(world: World) -> None:
    user = world.user("viewer")
    client = _verified_client(user)
    old = recovery_codes_issue(user)
    response = client.post("/accounts/2fa/recovery-codes/")
    assert response.status_code == 200
    new = _recovery_codes(response.content.decode())
    assert len(new) == 10
    assert not set(old) & set(new)
    assert "user.recovery_codes_regenerated" in _audit_actions(world.tenant_a)

    fresh = host_client(HOST_A, user)
    assert _verify(fresh, new[0]).status_code == 302
    stale = host_client(HOST_A, user)
    refused = _verify(stale, old[0])
    assert refused.status_code == 200
    assert "That code is not valid." in refused.content.decode()
    assert stale.get("/").status_code == 302


def test_new_recovery_codes_need_a_verified_session(world: World) -> None:
    user = world.user("viewer")
    _confirmed_device(user)
    old = recovery_codes_issue(user)
    response = host_client(HOST_A, user).post("/accounts/2fa/recovery-codes/")
    assert response.status_code == 302
    assert response["Location"].startswith(VERIFY)
    assert sorted(StaticToken.objects.filter(device__user=user).values_list("token", flat=True)) == sorted(old)
